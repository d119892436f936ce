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
    from mlsignal.cli.data import unreachable
    from shared.errors import Unavailable
    from shared.server.startup import database_label
    from shared.settings import Settings
    from shared.store.migrate import upgrade

    url = Settings.from_env().database_url
    try:
        rev = upgrade(url, args.revision)
    except Unavailable as exc:
        raise unreachable(url, exc) from None
    print(f"database {database_label(url)} is at revision {rev}")
    return 0
