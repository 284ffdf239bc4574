"""One-shot set-up before the sweep workers start (the `init` service of docker/compose.yaml).

Creates the Optuna database when it is missing (the postgres image creates only POSTGRES_DB, which
the MLflow server uses: MLflow and Optuna both keep an `alembic_version` table, so they cannot share
one database), then Optuna's tables, once: several workers starting at once on a fresh database race
to create them (DuplicateObject / IntegrityError). Safe to run again: it changes nothing then.

Environment: POSTGRES_HOST (postgres), POSTGRES_PORT (5432), POSTGRES_USER, POSTGRES_PASSWORD,
POSTGRES_DB (the database to connect to for CREATE DATABASE), OPTUNA_DB (optuna).

`--check-env` only checks the environment (the `preflight` service, before PostgreSQL first starts):
POSTGRES_PASSWORD must be set and must not be .env.example's placeholder.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.parse


def env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        sys.exit(f"init: {name} is not set; copy .env.example to .env and fill it in.")
    return value


PLACEHOLDER_PASSWORD = "change-me"  # .env.example's value: `cp .env.example .env` alone must not start a stack


def check_password(password: str) -> None:
    """Exit with the fix when the password is .env.example's placeholder."""
    if password.strip().lower() == PLACEHOLDER_PASSWORD:
        sys.exit(f"init: POSTGRES_PASSWORD is .env.example's placeholder {PLACEHOLDER_PASSWORD!r}; set your own in "
                 ".env (letters, digits, - _ . only; e.g. `python -c \"import secrets; "
                 "print(secrets.token_urlsafe(24))\"`), then start the stack again.")


def connect(conninfo: str, attempts: int = 30):
    import psycopg

    for i in range(attempts):
        try:
            return psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            if i == attempts - 1:
                sys.exit(f"init: cannot reach PostgreSQL ({exc}).")
            time.sleep(2)


def ensure_database(host: str, port: str, user: str, password: str, maintenance_db: str, name: str) -> bool:
    from psycopg import conninfo, sql

    info = conninfo.make_conninfo(host=host, port=port, user=user, password=password, dbname=maintenance_db)
    with connect(info) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True


def main(argv: list[str]) -> int:
    check_password(env("POSTGRES_PASSWORD"))
    if argv == ["--check-env"]:
        print("init: environment checked")
        return 0
    import optuna

    host, port = env("POSTGRES_HOST", "postgres"), env("POSTGRES_PORT", "5432")
    user, password = env("POSTGRES_USER"), env("POSTGRES_PASSWORD")
    name = env("OPTUNA_DB", "optuna")
    created = ensure_database(host, port, user, password, env("POSTGRES_DB", "postgres"), name)
    url = (f"postgresql+psycopg://{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
           f"@{host}:{port}/{name}")
    optuna.storages.RDBStorage(url).engine.dispose()  # creates or upgrades-checks the schema
    print(f"init: database {name!r} {'created' if created else 'exists'}; Optuna schema ready "
          f"(storage postgresql+psycopg://{user}:***@{host}:{port}/{name})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
