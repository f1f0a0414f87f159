"""Debian's chromium as the browser tests and `benchmarks/dashboard.py` launch it: one place
for its path and flags (no imports beyond the standard library, so a benchmark can use it)."""

from __future__ import annotations

import os

CHROMIUM = os.environ.get("PLAIT_TEST_CHROMIUM") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu",
    # no traffic of its own: the network is closed and Chromium would retry for ever
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
