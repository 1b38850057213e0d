-- Impact before publishing (docs/impact.md): the contexts of decisions kept for replay, the
-- shadow version of each world with the difference reports of the instances evaluating it,
-- and replays of recorded contexts. Expand-only: the previous build reads none of this.

-- The validated context of a decision of a world that keeps them (`record_context = "full"`),
-- beside its record and outside the chain: pruned by age, while the chain still verifies.
CREATE TABLE core.decision_contexts (
    world       text        NOT NULL,
    seq         bigint      NOT NULL CHECK (seq > 0),
    decided_at  timestamptz NOT NULL,
    context     text        NOT NULL,
    PRIMARY KEY (world, seq)
);
-- Pruning takes the oldest contexts first, a batch at a time.
CREATE INDEX decision_contexts_by_time ON core.decision_contexts (decided_at);

-- At most one shadow per world: a published version evaluated beside the deployed one on a
-- sampled share of live decisions, whose answers are never returned or recorded.
CREATE TABLE core.shadows (
    world      text             NOT NULL PRIMARY KEY,
    id         text             NOT NULL UNIQUE,
    version    bigint           NOT NULL,
    sample     double precision NOT NULL CHECK (sample >= 0 AND sample <= 1),
    started_by text             NOT NULL,
    started_at timestamptz      NOT NULL
);

-- What each instance has counted for a shadow, as one JSON report (the API merges them).
CREATE TABLE core.shadow_reports (
    shadow_id  text        NOT NULL,
    instance   text        NOT NULL,
    world      text        NOT NULL,
    report     text        NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (shadow_id, instance)
);

-- A replay of a version (or the draft, `version` NULL) over a world's recorded contexts. A
-- worker claims it and renews `heartbeat_at` with each progress write; a replay whose worker
-- stopped renewing is taken again.
CREATE TABLE core.replays (
    id           text        NOT NULL PRIMARY KEY,
    world        text        NOT NULL,
    version      bigint,
    -- The draft replayed, as it was when the replay was requested.
    model        text        NOT NULL,
    since        timestamptz,
    row_limit    bigint      NOT NULL CHECK (row_limit > 0),
    status       text        NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    processed    bigint      NOT NULL DEFAULT 0,
    report       text,
    error        text,
    requested_by text        NOT NULL,
    requested_at timestamptz NOT NULL,
    claimed_by   text,
    heartbeat_at timestamptz,
    finished_at  timestamptz
);
CREATE INDEX replays_by_world ON core.replays (world, requested_at);
CREATE INDEX replays_unfinished ON core.replays (requested_at) WHERE status IN ('queued', 'running');
