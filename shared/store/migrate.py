"""Alembic migrations, run programmatically so the installed package needs no alembic.ini."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> str:
    """Create or migrate the schema; returns the revision the database is at afterwards."""
    from shared.store.db import make_engine

    engine = make_engine(url, create=True)
    try:
        cfg = alembic_config(url)
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        return current_revision(engine) or ""
    finally:
        engine.dispose()


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head() or ""


def schema_problem(current: str | None) -> str | None:
    """What keeps a database at migration `current` (None: no mlsignal schema) from being used by this version, as
    a sentence that says what to do; None when it is at this version's head."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head() or ""
    if current == head:
        return None
    if current is None:
        return "it has no mlsignal schema; create it with `mlsignal db upgrade`"
    known = {rev.revision for rev in script.walk_revisions()}
    if current in known:
        return f"its schema is at migration {current}, older than this version's {head}; run `mlsignal db upgrade`"
    return f"its schema is at migration {current}, which this version does not know (a newer mlsignal migrated it)"
