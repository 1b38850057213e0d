-- The World Agent's durable state (ARCHITECTURE.md, "src/store"): its threads with their run
-- lease and fencing token, the checkpoint after every node, each thread's ordered event log,
-- and the rule candidates it proposes for review. Expand-only: new tables that builds before
-- this one never read.

CREATE TABLE agent_threads (
    id                TEXT    PRIMARY KEY,
    world             TEXT    NOT NULL,
    kind              TEXT    NOT NULL CHECK (kind IN ('run', 'chat')),
    -- The chat thread a run was started inside.
    parent_thread     TEXT    REFERENCES agent_threads (id),
    -- The key id that started it.
    created_by        TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    task              TEXT    NOT NULL,
    -- The worker advancing the thread, until lease_expires_at.
    lease_owner       TEXT,
    lease_expires_at  INTEGER,
    -- Incremented on every acquisition of the lease: a write carrying an older token is from
    -- a worker that lost the thread, and is refused.
    fence             INTEGER NOT NULL DEFAULT 0,
    calls             INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    finished_at       INTEGER,
    -- When retention removed the thread's history (all but its final checkpoint).
    pruned_at         INTEGER
) STRICT;

CREATE INDEX agent_threads_by_world ON agent_threads (world, created_at);
-- Runs to resume: running threads whose lease expired (or was never taken).
CREATE INDEX agent_threads_leases ON agent_threads (lease_expires_at) WHERE status = 'running';
-- Retention: finished threads not yet pruned, oldest first.
CREATE INDEX agent_threads_finished ON agent_threads (finished_at)
    WHERE finished_at IS NOT NULL AND pruned_at IS NULL;

-- The state after every node. (thread, step) is written once: a step re-run after a crash
-- writes nothing.
CREATE TABLE agent_checkpoints (
    thread      TEXT    NOT NULL REFERENCES agent_threads (id),
    step        INTEGER NOT NULL,
    parent_step INTEGER,
    node        TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (thread, step)
) STRICT;

-- Each thread's ordered log (tokens, node started/finished, errors), for streaming and replay.
CREATE TABLE agent_events (
    thread     TEXT    NOT NULL REFERENCES agent_threads (id),
    seq        INTEGER NOT NULL,
    step       INTEGER NOT NULL,
    kind       TEXT    NOT NULL,
    data       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (thread, seq)
) STRICT;

-- What a run proposes: at most one candidate per run thread, kept after retention.
CREATE TABLE rule_candidates (
    id              TEXT    PRIMARY KEY,
    world           TEXT    NOT NULL,
    action          TEXT    NOT NULL,
    run_thread      TEXT    NOT NULL UNIQUE REFERENCES agent_threads (id),
    rule            TEXT    NOT NULL,
    evidence        TEXT    NOT NULL,
    model           TEXT    NOT NULL,
    prompt_versions TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'proposed'
                    CHECK (status IN ('proposed', 'approved', 'rejected')),
    reviewer        TEXT,
    rationale       TEXT,
    reviewed_at     INTEGER,
    created_at      INTEGER NOT NULL
) STRICT;

CREATE INDEX rule_candidates_by_world ON rule_candidates (world, created_at);
