"""The store layer registry and auth share: one async database on SQLite or PostgreSQL.

`database_url` turns a service's setting into a SQLAlchemy async URL, `Database` opens
it, migrates the service's schema to head and hands out read and write transactions.
"""

from services.store.database import Database, database_url, masked

__all__ = ["Database", "database_url", "masked"]
