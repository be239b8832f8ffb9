"""The registry's first schema: models, versions, aliases with their moves, deployments,
and the revisioned change feed.

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


def upgrade() -> None:
    registry_state = op.create_table(
        "registry_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("at_us", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(registry_state, [{"id": 1, "revision": 0, "at_us": 0}])
    op.create_table(
        "models",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("owner_tenant", sa.Text, nullable=False),
        sa.Column("last_version", sa.BigInteger, nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
        sa.Column("updated_by", sa.Text, nullable=False),
    )
    op.create_table(
        "model_labels",
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("model", "key"),
        sa.ForeignKeyConstraint(["model"], ["models.name"]),
    )
    op.create_table(
        "versions",
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("format", sa.Text, nullable=False),
        sa.Column("config", sa.LargeBinary, nullable=False),
        sa.Column("lineage", sa.LargeBinary, nullable=False),
        sa.Column("facts", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("model", "version"),
        sa.ForeignKeyConstraint(["model"], ["models.name"]),
    )
    op.create_index("ix_versions_sha256", "versions", ["sha256"])
    op.create_table(
        "aliases",
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
        sa.Column("updated_by", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("model", "name"),
        sa.ForeignKeyConstraint(["model", "version"], ["versions.model", "versions.version"]),
    )
    op.create_table(
        "alias_moves",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("alias", sa.String(128), nullable=False),
        sa.Column("from_version", sa.BigInteger, nullable=False),
        sa.Column("to_version", sa.BigInteger, nullable=False),
        sa.Column("at_us", sa.BigInteger, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("rollback", sa.Boolean, nullable=False),
        sa.ForeignKeyConstraint(["model"], ["models.name"]),
    )
    op.create_index("ix_alias_moves_alias", "alias_moves", ["model", "alias", "revision"])
    op.create_table(
        "deployments",
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("target", sa.String(160), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=True),
        sa.Column("alias", sa.String(128), nullable=True),
        sa.Column("instances", sa.Integer, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("model", "target"),
        sa.ForeignKeyConstraint(["model", "version"], ["versions.model", "versions.version"]),
        sa.ForeignKeyConstraint(["model", "alias"], ["aliases.model", "aliases.name"]),
    )
    op.create_table(
        "events",
        sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("at_us", sa.BigInteger, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "events",
        "deployments",
        "alias_moves",
        "aliases",
        "versions",
        "model_labels",
        "models",
        "registry_state",
    ):
        op.drop_table(table)
