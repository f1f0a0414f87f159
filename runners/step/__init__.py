"""``python -m plait.runners.step``: run one leased task and exit (containers, cluster jobs)."""
