-- The World Agent's durable state (ARCHITECTURE.md, "src/store"): its threads with their run
-- lease and fencing token, the checkpoint after every node, each thread's ordered event log,
-- and the rule candidates it proposes for review. Expand-only: new tables that builds before
-- this one never read.

CREATE TABLE core.agent_threads (
    id                text        PRIMARY KEY,
    world             text        NOT NULL,
    kind              text        NOT NULL CHECK (kind IN ('run', 'chat')),
    -- The chat thread a run was started inside.
    parent_thread     text        REFERENCES core.agent_threads (id),
    -- The key id that started it.
    created_by        text        NOT NULL,
    status            text        NOT NULL,
    task              jsonb       NOT NULL,
    -- The worker advancing the thread, until lease_expires_at.
    lease_owner       text,
    lease_expires_at  timestamptz,
    -- Incremented on every acquisition of the lease: a write carrying an older token is from
    -- a worker that lost the thread, and is refused.
    fence             bigint      NOT NULL DEFAULT 0,
    calls             bigint      NOT NULL DEFAULT 0,
    prompt_tokens     bigint      NOT NULL DEFAULT 0,
    completion_tokens bigint      NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    finished_at       timestamptz,
    -- When retention removed the thread's history (all but its final checkpoint).
    pruned_at         timestamptz
);

CREATE INDEX agent_threads_by_world ON core.agent_threads (world, created_at);
-- Runs to resume: running threads whose lease expired (or was never taken).
CREATE INDEX agent_threads_leases ON core.agent_threads (lease_expires_at)
    WHERE status = 'running';
-- Retention: finished threads not yet pruned, oldest first.
CREATE INDEX agent_threads_finished ON core.agent_threads (finished_at)
    WHERE finished_at IS NOT NULL AND pruned_at IS NULL;

-- The state after every node. (thread, step) is written once: a step re-run after a crash
-- writes nothing.
CREATE TABLE core.agent_checkpoints (
    thread      text        NOT NULL REFERENCES core.agent_threads (id),
    step        bigint      NOT NULL,
    parent_step bigint,
    node        text        NOT NULL,
    state       jsonb       NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (thread, step)
);

-- Each thread's ordered log (tokens, node started/finished, errors), for streaming and replay.
CREATE TABLE core.agent_events (
    thread     text        NOT NULL REFERENCES core.agent_threads (id),
    seq        bigint      NOT NULL,
    step       bigint      NOT NULL,
    kind       text        NOT NULL,
    data       jsonb       NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (thread, seq)
);

-- What a run proposes: at most one candidate per run thread, kept after retention.
CREATE TABLE core.rule_candidates (
    id              text        PRIMARY KEY,
    world           text        NOT NULL,
    action          text        NOT NULL,
    run_thread      text        NOT NULL UNIQUE REFERENCES core.agent_threads (id),
    rule            jsonb       NOT NULL,
    evidence        jsonb       NOT NULL,
    model           text        NOT NULL,
    prompt_versions jsonb       NOT NULL,
    status          text        NOT NULL DEFAULT 'proposed'
                    CHECK (status IN ('proposed', 'approved', 'rejected')),
    reviewer        text,
    rationale       text,
    reviewed_at     timestamptz,
    created_at      timestamptz NOT NULL
);

CREATE INDEX rule_candidates_by_world ON core.rule_candidates (world, created_at);
