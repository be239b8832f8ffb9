"""The auth service's first schema: tenants, API keys, prices, the usage ledger and the
applied usage batches.

Written out in full rather than built from schema.py, so that this migration stays what
it was when later ones change the tables.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _quota_columns() -> list[sa.Column[int]]:
    return [
        sa.Column(name, sa.BigInteger, nullable=False)
        for name in (
            "requests_per_minute",
            "tokens_per_minute",
            "tokens_per_day",
            "concurrent_streams",
        )
    ]


def upgrade() -> None:
    op.create_table(
        "auth_tenants",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        *_quota_columns(),
        sa.Column("monthly_spend_cap", sa.Double, nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "auth_api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("models", sa.Text, nullable=False),
        sa.Column("admin", sa.Boolean, nullable=False),
        *_quota_columns(),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("expire_us", sa.BigInteger, nullable=True),
        sa.Column("revoke_us", sa.BigInteger, nullable=True),
        sa.Column("rotated_from", sa.String(32), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["auth_tenants.id"]),
    )
    op.create_index("ix_auth_api_keys_tenant", "auth_api_keys", ["tenant_id"])
    op.create_table(
        "auth_prices",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("per_1k_prompt_tokens", sa.Double, nullable=False),
        sa.Column("per_1k_completion_tokens", sa.Double, nullable=False),
        sa.Column("per_compute_second", sa.Double, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "auth_usage",
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("errors", sa.BigInteger, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("compute_micros", sa.BigInteger, nullable=False),
        sa.Column("cost", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "key_id", "model", "day"),
    )
    op.create_index("ix_auth_usage_day", "auth_usage", ["day"])
    op.create_table(
        "auth_usage_batches",
        sa.Column("batch_id", sa.String(128), primary_key=True),
        sa.Column("applied_us", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_auth_usage_batches_applied", "auth_usage_batches", ["applied_us"])


def downgrade() -> None:
    for table in (
        "auth_usage_batches",
        "auth_usage",
        "auth_prices",
        "auth_api_keys",
        "auth_tenants",
    ):
        op.drop_table(table)
