"""The metadata store: schema, the transaction runner, and one repository per aggregate.

Repository functions take a SQLAlchemy ``Connection`` and never commit: the caller owns the
transaction (``await store.write(fn, ...)`` / ``await store.read(fn, ...)``). They return the
domain records of :mod:`plait._models` or small dataclasses of their own, never API messages.

* :mod:`._schema` tables; :mod:`._engine` the :class:`Store` (SQLite hot path, migrations)
* :mod:`._scheduling` the scheduler's reads and the writing of its effects
* :mod:`._runs`, :mod:`._pipelines`, :mod:`._artifacts`, :mod:`._stacks`, :mod:`._tokens`
"""

from plait.engine.store._engine import MIGRATIONS, SCHEMA_HEAD, Store

__all__ = ["MIGRATIONS", "SCHEMA_HEAD", "Store"]
