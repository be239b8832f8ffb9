"""The registry's tables (SQLAlchemy Core), as migrations/ builds them.

Times are integer microseconds since the epoch: exact, portable between SQLite and
PostgreSQL, and ordered, which point-in-time questions ("what did production point at
last Tuesday") need. Protobuf messages that are only ever read back whole (a version's
Triton config and lineage, a feed event) are stored serialized.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

metadata = MetaData()

# One row (id 1): the feed's current revision and the time of its last change. Every
# write locks it first, which serializes writers across processes on PostgreSQL, so
# revisions commit in order and a watcher that reads past revision n misses nothing.
registry_state = Table(
    "registry_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("revision", BigInteger, nullable=False),
    Column("at_us", BigInteger, nullable=False),
)

models = Table(
    "models",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("task", Text, nullable=False),
    Column("description", Text, nullable=False),
    Column("owner_tenant", Text, nullable=False),
    # The highest version number ever given out: deleted numbers are never reused.
    Column("last_version", BigInteger, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("updated_by", Text, nullable=False),
)

# Labels as rows rather than a JSON column, so that ListModels filters and pages in SQL.
model_labels = Table(
    "model_labels",
    metadata,
    Column("model", String(128), nullable=False),
    Column("key", Text, nullable=False),
    Column("value", Text, nullable=False),
    PrimaryKeyConstraint("model", "key"),
    ForeignKeyConstraint(["model"], ["models.name"]),
)

versions = Table(
    "versions",
    metadata,
    Column("model", String(128), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("format", Text, nullable=False),
    Column("config", LargeBinary, nullable=False),  # registry_pb2.TritonConfig
    Column("lineage", LargeBinary, nullable=False),  # registry_pb2.Lineage
    Column("facts", Text, nullable=False),  # JSON object of numbers
    Column("description", Text, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    PrimaryKeyConstraint("model", "version"),
    ForeignKeyConstraint(["model"], ["models.name"]),
    Index("ix_versions_sha256", "sha256"),
)

aliases = Table(
    "aliases",
    metadata,
    Column("model", String(128), nullable=False),
    Column("name", String(128), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("updated_by", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("revision", BigInteger, nullable=False),
    # The alias's policy: the most quality loss (a version's `quality_loss` fact) a
    # version it points at may have; NULL: none.
    Column("max_quality_loss", Float, nullable=True),
    PrimaryKeyConstraint("model", "name"),
    # The store refuses to delete a version an alias points at; this is the backstop.
    ForeignKeyConstraint(["model", "version"], ["versions.model", "versions.version"]),
)

# Every move of every alias, kept after the alias or its versions are deleted.
alias_moves = Table(
    "alias_moves",
    metadata,
    # SQLite autoincrements only an INTEGER primary key.
    Column(
        "id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("model", String(128), nullable=False),
    Column("alias", String(128), nullable=False),
    Column("from_version", BigInteger, nullable=False),  # 0: created by this move
    Column("to_version", BigInteger, nullable=False),  # 0: deleted by this move
    Column("at_us", BigInteger, nullable=False),
    Column("actor", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("rollback", Boolean, nullable=False),
    ForeignKeyConstraint(["model"], ["models.name"]),
    Index("ix_alias_moves_alias", "model", "alias", "revision"),
)

# A deployment targets a fixed version or an alias: exactly one of the two is set, and
# `target` ("version:3" or "alias:production") keys it within its model.
deployments = Table(
    "deployments",
    metadata,
    Column("model", String(128), nullable=False),
    Column("target", String(160), nullable=False),
    Column("version", BigInteger, nullable=True),
    Column("alias", String(128), nullable=True),
    Column("instances", Integer, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("revision", BigInteger, nullable=False),
    PrimaryKeyConstraint("model", "target"),
    ForeignKeyConstraint(["model", "version"], ["versions.model", "versions.version"]),
    ForeignKeyConstraint(["model", "alias"], ["aliases.model", "aliases.name"]),
)

# The change feed: one registry_pb2.RegistryEvent per revision, with what it is about
# (feed.subject_of), so that a compacted Watch can leave out superseded events.
events = Table(
    "events",
    metadata,
    Column("revision", BigInteger, primary_key=True, autoincrement=False),
    Column("at_us", BigInteger, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("subject", String(400), nullable=True),
    Index("ix_events_subject", "subject", "revision"),
)

# Optimization jobs (optimization/runner.py): each derives at most one version, recorded
# in result_version as soon as it exists, so that a job cut short (a registry restart)
# can be found and its version removed.
optimization_jobs = Table(
    "optimization_jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("model", String(128), nullable=False),
    Column("parent_version", BigInteger, nullable=False),
    Column("steps", Text, nullable=False),  # JSON list of {"method", "parameters"}
    Column("description", Text, nullable=False),
    Column("latency_calls", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # queued, running, done, failed
    Column("stage", Text, nullable=False),
    Column("progress", Float, nullable=False),
    Column("error", Text, nullable=False),
    Column("result_version", BigInteger, nullable=False),  # 0: none (yet)
    Column("created_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("created_by", Text, nullable=False),
    Index("ix_optimization_jobs_model", "model", "created_us"),
    Index("ix_optimization_jobs_created", "created_us"),
)
