"""The Plait control-plane API: generated messages and service stubs in :mod:`plait.api.v1`."""
