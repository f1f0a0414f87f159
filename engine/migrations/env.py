"""Alembic's environment for the Plait store: migrations run on the connection the store gives."""

from alembic import context

from plait.engine.store._schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
