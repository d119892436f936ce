"""`mlsignal db upgrade`: create or migrate the schema."""

from __future__ import annotations


def register(sub) -> None:
    from mlsignal.cli import DATABASE

    p = sub.add_parser("db", help="database schema")
    dsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = dsub.add_parser("upgrade", help="create or migrate the schema (Alembic) on MLSIGNAL_DATABASE_URL")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    up.set_defaults(func=_upgrade, needs=DATABASE)


def _upgrade(args) -> int:
    import sqlalchemy as sa

    from shared.errors import Unavailable
    from shared.settings import Settings
    from shared.store.migrate import upgrade

    settings = Settings.from_env()
    try:
        rev = upgrade(settings.database_url, args.revision)
    except sa.exc.OperationalError as exc:
        raise Unavailable(f"cannot reach the database {_redact(settings.database_url)}: {exc.orig}") from None
    print(f"database {_redact(settings.database_url)} is at revision {rev}")
    return 0


def _redact(url: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(url).render_as_string(hide_password=True)
