"""The ledger gains an index on (tenant_id, day): every key lookup sums the tenant's
spend this month and its tokens today, which through the primary key (tenant, key,
model, day) read every row of the tenant's history.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_auth_usage_tenant_day", "auth_usage", ["tenant_id", "day"])


def downgrade() -> None:
    op.drop_index("ix_auth_usage_tenant_day", table_name="auth_usage")
