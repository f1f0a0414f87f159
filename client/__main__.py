"""``python -m plait``: the same as the ``plait`` command."""

from plait._cli import main

main()
