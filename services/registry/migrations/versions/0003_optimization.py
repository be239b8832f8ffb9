"""Model optimization: the jobs that derive quantized/pruned versions, and an alias's
policy bounding the quality a version it points at may have lost (max_quality_loss).

Written out in full rather than built from schema.py, so that this migration stays what
it was when later ones change the tables.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("aliases") as batch:
        batch.add_column(sa.Column("max_quality_loss", sa.Float, nullable=True))
    op.create_table(
        "optimization_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("parent_version", sa.BigInteger, nullable=False),
        sa.Column("steps", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("latency_calls", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stage", sa.Text, nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("result_version", sa.BigInteger, nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
    )
    op.create_index("ix_optimization_jobs_model", "optimization_jobs", ["model", "created_us"])
    op.create_index("ix_optimization_jobs_created", "optimization_jobs", ["created_us"])


def downgrade() -> None:
    op.drop_table("optimization_jobs")
    with op.batch_alter_table("aliases") as batch:
        batch.drop_column("max_quality_loss")
