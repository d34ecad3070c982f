"""Corrections stores for tests: SQLite in a temporary folder, and the real PostgreSQL in a schema of its own."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

from .services import unavailable

POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgresql")


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A DATABASE_URL whose connections live in a fresh schema of the test database, dropped afterwards."""
    import sqlalchemy as sa

    from ls_backend.store import database_url

    admin = sa.create_engine(database_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # refused, not running, no such database
        admin.dispose()
        unavailable(f"PostgreSQL at {POSTGRES_URL} is not reachable ({type(exc).__name__}: {str(exc)[:120]})")
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextlib.contextmanager
def store_url(backend: str, folder: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'store.sqlite'}"
    else:
        with postgres_schema() as url:
            yield url
