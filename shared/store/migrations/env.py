"""Alembic environment: uses the connection handed in by shared.store.migrate, or the configured URL."""

from alembic import context

from shared.store.db import make_engine, metadata

config = context.config


def run() -> None:
    conn = config.attributes.get("connection")
    if conn is not None:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database to migrate: set sqlalchemy.url (shared.store.migrate.alembic_config does)")
    engine = make_engine(url)
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
