"""The metadata store's schema: SQLAlchemy Core tables, and the rows a new database starts with.

Alembic migrations (``engine/migrations``) evolve it; a test checks that creating these tables
and running every migration give the same schema.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

metadata = sa.MetaData()

meta_info = sa.Table(
    "plait_meta",
    metadata,
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.String, nullable=False),
)

pipelines = sa.Table(
    "pipelines",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

pipeline_versions = sa.Table(
    "pipeline_versions",
    metadata,
    sa.Column("version", sa.String, primary_key=True),
    sa.Column("pipeline", sa.String, sa.ForeignKey("pipelines.name"), nullable=False),
    sa.Column("spec", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("pipeline", sa.String, nullable=False, index=True),
    sa.Column("version", sa.String, sa.ForeignKey("pipeline_versions.version"), nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("parameters", sa.JSON, nullable=False),
    sa.Column("no_cache", sa.Boolean, nullable=False),
    sa.Column("request_id", sa.String, unique=True),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("ended_at", sa.Float),
    sa.Column("stack", sa.String),
    # the code the run executes: a content-addressed archive of the source root, and git's view
    sa.Column("code_archive", sa.String),
    sa.Column("git_commit", sa.String),
    sa.Column("git_dirty", sa.Boolean),
    # the control-plane replica that schedules the run (see the replicas table); another takes
    # it over when that one's lease expires
    sa.Column("owner", sa.String, index=True),
    # a cancellation asked of a replica that does not schedule the run: its owner carries it out
    sa.Column("cancel_requested_at", sa.Float),
    # the steps the run refreshes (run even when cached): a JSON list of step ids, or NULL
    sa.Column("refresh", sa.JSON),
    # the run this one retries (plait runs retry), or NULL
    sa.Column("retry_of", sa.String),
)

step_runs = sa.Table(
    "step_runs",
    metadata,
    sa.Column("run_id", sa.String, sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("step_id", sa.String, primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("cache_key", sa.String),
    sa.Column("outputs", sa.JSON),
    sa.Column("step_metadata", sa.JSON),
    sa.Column("error", sa.JSON),
    sa.Column("started_at", sa.Float),
    sa.Column("ended_at", sa.Float),
    # RETRYING: when the next attempt is due (a retry's delay, backoff and jitter applied)
    sa.Column("retry_at", sa.Float),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("run_id", sa.String, primary_key=True),
    sa.Column("step_id", sa.String, primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("runner", sa.String, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("ended_at", sa.Float),
    # the durable queue: a QUEUED attempt with no holder waits for one (a restarted control
    # plane hands out the same attempt again); pool: the remote worker pool it waits in
    sa.Column("pool", sa.String),
    # the lease: who holds the attempt (a worker id), its runner's handle (a pid, a container
    # id), and the deadlines the reaper enforces (epoch seconds)
    sa.Column("holder", sa.String),
    sa.Column("handle", sa.String),
    sa.Column("leased_at", sa.Float),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("queue_deadline", sa.Float),
    sa.Column("close_deadline", sa.Float),
    # the highest log batch number seen (a retried AppendLogs is dropped)
    sa.Column("log_batch", sa.Integer, nullable=False, server_default="0"),
    sa.ForeignKeyConstraint(["run_id", "step_id"], ["step_runs.run_id", "step_runs.step_id"]),
)

artifacts = sa.Table(
    "artifacts",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    # no index on run_id or digest: no query reads through them, and each would cost every
    # step's commit its pages (migration 0011)
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("step_id", sa.String, nullable=False),
    sa.Column("output", sa.String, nullable=False),
    sa.Column("digest", sa.String, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("uri", sa.String, nullable=False),
    sa.Column("materializer", sa.String, nullable=False),
    sa.Column("data_type", sa.String, nullable=False),
    sa.Column("unsafe", sa.Boolean, nullable=False),
    sa.Column("artifact_metadata", sa.JSON),
    sa.Column("created_at", sa.Float, nullable=False),
)

cache_entries = sa.Table(
    "cache_entries",
    metadata,
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("material", sa.JSON, nullable=False),
    sa.Column("outputs", sa.JSON, nullable=False),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("step_id", sa.String, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("step_id", sa.String, nullable=False),
    sa.Column("run_status", sa.String),
    sa.Column("step_status", sa.String),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("message", sa.String, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Index("ix_events_run_seq", "run_id", "seq"),
    sqlite_autoincrement=True,  # sequence numbers are never reused, even after deletes
)

logs = sa.Table(
    "logs",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("step_id", sa.String, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("stream", sa.String, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Index("ix_logs_run_step_seq", "run_id", "step_id", "seq"),
    sqlite_autoincrement=True,
)

components = sa.Table(
    "components",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("flavor", sa.String, nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

stacks = sa.Table(
    "stacks",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    # kind -> component name
    sa.Column("components", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

replicas = sa.Table(
    "replicas",
    metadata,
    # the control planes sharing this database: each renews its row while it lives; one whose
    # row expired is gone, and a live one takes over its runs
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("address", sa.String, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

builds = sa.Table(
    "builds",
    metadata,
    # a container image or a virtualenv made for an environment, addressed by the sha256 of its
    # key material; one row per key, claimed by the replica that builds it (status BUILDING,
    # holder, expires_at), so one key is built once however many runs and replicas ask
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("build_digest", sa.String, nullable=False),
    sa.Column("material", sa.JSON, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("holder", sa.String, nullable=False, server_default=""),
    sa.Column("expires_at", sa.Float, nullable=False, server_default="0"),
    sa.Column("reference", sa.String, nullable=False, server_default=""),
    sa.Column("image_id", sa.String, nullable=False, server_default=""),
    sa.Column("size_bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("duration_seconds", sa.Float, nullable=False, server_default="0"),
    sa.Column("source", sa.String, nullable=False, server_default=""),
    sa.Column("pushed_to", sa.String, nullable=False, server_default=""),
    sa.Column("error", sa.String, nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_used_at", sa.Float, nullable=False),
    sa.Index("ix_builds_last_used_at", "last_used_at"),
)

build_runs = sa.Table(
    "build_runs",
    metadata,
    # which runs used which build (a run's steps may use several)
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("run_id", sa.String, primary_key=True),
    sa.Column("used_at", sa.Float, nullable=False),
)

settings = sa.Table(
    "settings",
    metadata,
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.String, nullable=False),
)

DEFAULT_COMPONENTS = (
    {"name": "local", "kind": "RUNNER", "flavor": "local", "config": {}, "created_at": 0.0},
    {
        "name": "local-artifacts",
        "kind": "ARTIFACT_STORE",
        "flavor": "local",
        "config": {},
        "created_at": 0.0,
    },
)
DEFAULT_STACK = {
    "name": "default",
    "components": {"RUNNER": "local", "ARTIFACT_STORE": "local-artifacts"},
    "created_at": 0.0,
}


def insert_defaults(conn: Connection) -> None:
    """The default stack (local runner, local artifact store), active: there from the start."""
    conn.execute(components.insert(), list(DEFAULT_COMPONENTS))
    conn.execute(stacks.insert(), [DEFAULT_STACK])
    conn.execute(settings.insert().values(key="active_stack", value="default"))


api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("name", sa.String, nullable=False),
    # sha256 of the secret: a stolen database does not hand out working tokens
    sa.Column("secret_hash", sa.String, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
    # admin, user or worker (plait.engine.store._tokens.ROLES)
    sa.Column("role", sa.String, nullable=False, server_default="admin"),
)
