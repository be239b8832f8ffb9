"""Feed events gain `subject`: the version, alias, deployment or model each is about, so a
compacted Watch can send only the newest event of each (WatchRequest.compacted).

Existing events get theirs from their payload.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from tensorgate.registry.v1 import registry_pb2

from services.registry.feed import subject_of

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("subject", sa.String(400), nullable=True))
    events = sa.table(
        "events",
        sa.column("revision", sa.BigInteger),
        sa.column("payload", sa.LargeBinary),
        sa.column("subject", sa.String),
    )
    connection = op.get_bind()
    after = 0
    while True:
        rows = connection.execute(
            sa.select(events.c.revision, events.c.payload)
            .where(events.c.revision > after)
            .order_by(events.c.revision)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        for number, payload in rows:
            subject = subject_of(registry_pb2.RegistryEvent.FromString(payload))
            connection.execute(
                sa.update(events).where(events.c.revision == number).values(subject=subject)
            )
        after = rows[-1][0]
    op.create_index("ix_events_subject", "events", ["subject", "revision"])


def downgrade() -> None:
    op.drop_index("ix_events_subject", "events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("subject")
