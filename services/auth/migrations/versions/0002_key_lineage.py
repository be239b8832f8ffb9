"""API keys gain `lineage_id`: the key id of the first key of their rotation chain, which
names the per-key quota counters a rotated key shares with its successor.

Existing keys are given theirs by following `rotated_from` back to the first key.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("auth_api_keys") as batch:
        batch.add_column(sa.Column("lineage_id", sa.String(32), nullable=False, server_default=""))
    keys = sa.table(
        "auth_api_keys",
        sa.column("key_id", sa.String),
        sa.column("rotated_from", sa.String),
        sa.column("lineage_id", sa.String),
    )
    connection = op.get_bind()
    parents = dict(connection.execute(sa.select(keys.c.key_id, keys.c.rotated_from)).all())
    for key_id in parents:
        root, seen = key_id, {key_id}
        # A chain is short (one link per rotation); `seen` stops a cycle no rotation makes.
        while parents.get(root) and parents[root] in parents and parents[root] not in seen:
            root = parents[root]
            seen.add(root)
        connection.execute(sa.update(keys).where(keys.c.key_id == key_id).values(lineage_id=root))


def downgrade() -> None:
    with op.batch_alter_table("auth_api_keys") as batch:
        batch.drop_column("lineage_id")
