"""Server administration for the ``plait`` command: the daemon (``plait server``, ``up``,
``down``) and API tokens (``plait token``).

The root group in ``plait.cli`` imports these modules only when one of their commands runs, so
the rest of the command line never loads the engine. Nothing else in ``plait.engine`` imports
them: the engine itself does not need click.
"""
