"""Feed events gain `subject`: the version, alias, deployment or model each is about, so a
compacted Watch can send only the newest event of each (WatchRequest.compacted).

Existing events get theirs from their payload.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from tensorgate.registry.v1 import registry_pb2

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
        subjects = [
            {"number": number, "subject": _subject(registry_pb2.RegistryEvent.FromString(payload))}
            for number, payload in rows
        ]
        # One statement for the batch (executemany), not a round trip per event.
        connection.execute(
            sa.update(events)
            .where(events.c.revision == sa.bindparam("number"))
            .values(subject=sa.bindparam("subject")),
            subjects,
        )
        after = rows[-1][0]
    op.create_index("ix_events_subject", "events", ["subject", "revision"])


def downgrade() -> None:
    op.drop_index("ix_events_subject", "events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("subject")


def _subject(event: registry_pb2.RegistryEvent) -> str:
    """feed.subject_of as it was when this migration was written: a migration stays
    what it was, whatever later code does."""
    change = event.WhichOneof("change")
    if change == "model_changed":
        return f"model/{event.model_changed.name}"
    if change in ("version_created", "version_deleted"):
        version = getattr(event, change)
        return f"version/{version.model}/{version.version}"
    if change == "alias_moved":
        return f"alias/{event.alias_moved.model}/{event.alias_moved.name}"
    if change == "alias_deleted":
        return f"alias/{event.alias_deleted.model}/{event.alias_deleted.alias}"
    if change in ("deployment_set", "deployment_deleted"):
        target = getattr(event, change)
        if target.WhichOneof("target") == "alias":
            return f"deployment/{target.model}@{target.alias}"
        return f"deployment/{target.model}:{target.version}"
    return f"revision/{event.revision}"
