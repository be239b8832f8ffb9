"""The auth service's tables (SQLAlchemy Core), as migrations/ builds them.

Every table is named `auth_*`: registry and auth may share one PostgreSQL database,
each with its own Alembic version table. Times are integer microseconds since the
epoch, as in the registry. A key's secret is never stored, only its SHA-256
(services.runtime.api_keys). Usage days are `YYYY-MM-DD` text, which sorts as dates do,
so a month or a range of days is a plain range condition on every database.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKeyConstraint,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

metadata = MetaData()

tenants = Table(
    "auth_tenants",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("description", Text, nullable=False),
    Column("requests_per_minute", BigInteger, nullable=False),
    Column("tokens_per_minute", BigInteger, nullable=False),
    Column("tokens_per_day", BigInteger, nullable=False),
    Column("concurrent_streams", BigInteger, nullable=False),
    Column("monthly_spend_cap", Double, nullable=False),
    Column("created_us", BigInteger, nullable=False),
)

api_keys = Table(
    "auth_api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("tenant_id", String(128), nullable=False),
    Column("name", Text, nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("models", Text, nullable=False),  # JSON list of model patterns
    Column("admin", Boolean, nullable=False),
    Column("requests_per_minute", BigInteger, nullable=False),
    Column("tokens_per_minute", BigInteger, nullable=False),
    Column("tokens_per_day", BigInteger, nullable=False),
    Column("concurrent_streams", BigInteger, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("expire_us", BigInteger, nullable=True),  # NULL: never expires
    Column("revoke_us", BigInteger, nullable=True),  # NULL: not revoked
    Column("rotated_from", String(32), nullable=False),  # "" unless made by a rotation
    # The first key of its rotation chain (itself, unless made by a rotation): a rotated
    # key and its successor count in one set of per-key quota counters.
    Column("lineage_id", String(32), nullable=False),
    ForeignKeyConstraint(["tenant_id"], ["auth_tenants.id"]),
    Index("ix_auth_api_keys_tenant", "tenant_id"),
)

prices = Table(
    "auth_prices",
    metadata,
    Column("model", String(128), primary_key=True),
    Column("per_1k_prompt_tokens", Double, nullable=False),
    Column("per_1k_completion_tokens", Double, nullable=False),
    Column("per_compute_second", Double, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
)

# The ledger: one row per tenant, key, model and UTC day, added to by each usage batch.
# No foreign keys: a record is what a gateway saw happen, and it is kept even if it
# names a key or tenant this database does not (or no longer) know.
usage = Table(
    "auth_usage",
    metadata,
    Column("tenant_id", String(128), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("model", String(256), nullable=False),
    Column("day", String(10), nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("compute_micros", BigInteger, nullable=False),
    Column("cost", Double, nullable=False),
    # Tenant first: a tenant's month (its spend) is a range of this key.
    PrimaryKeyConstraint("tenant_id", "key_id", "model", "day"),
    Index("ix_auth_usage_day", "day"),
    # A tenant's days: the month's spend and the day's tokens that every key lookup reads
    # (the primary key would scan the tenant's whole history for them).
    Index("ix_auth_usage_tenant_day", "tenant_id", "day"),
)

# Batch ids already applied to the ledger, so a batch a gateway retries counts once;
# pruned after a week (a gateway gives up on a batch long before that).
usage_batches = Table(
    "auth_usage_batches",
    metadata,
    Column("batch_id", String(128), primary_key=True),
    Column("applied_us", BigInteger, nullable=False),
    Index("ix_auth_usage_batches_applied", "applied_us"),
)
