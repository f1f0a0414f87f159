"""The Plait IR: generated messages in :mod:`plait.ir.v1`, helpers both sides need here.

:mod:`plait.ir.canonical` defines the canonical encoding that pipeline versions, cache keys and
environment digests are computed from.
"""
