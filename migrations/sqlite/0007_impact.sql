-- Impact before publishing (docs/impact.md): the contexts of decisions kept for replay, the
-- shadow version of each world with the difference reports of the instances evaluating it,
-- and replays of recorded contexts. Expand-only: the previous build reads none of this.
--
-- Times are INTEGER microseconds since the Unix epoch.

-- The validated context of a decision of a world that keeps them (`record_context = "full"`),
-- beside its record and outside the chain: pruned by age, while the chain still verifies.
CREATE TABLE decision_contexts (
    world       TEXT    NOT NULL,
    seq         INTEGER NOT NULL CHECK (seq > 0),
    decided_at  INTEGER NOT NULL,
    context     TEXT    NOT NULL,
    PRIMARY KEY (world, seq)
) STRICT;
-- Pruning takes the oldest contexts first, a batch at a time.
CREATE INDEX decision_contexts_by_time ON decision_contexts (decided_at);

-- At most one shadow per world: a published version evaluated beside the deployed one on a
-- sampled share of live decisions, whose answers are never returned or recorded.
CREATE TABLE shadows (
    world      TEXT    NOT NULL PRIMARY KEY,
    id         TEXT    NOT NULL UNIQUE,
    version    INTEGER NOT NULL,
    sample     REAL    NOT NULL CHECK (sample >= 0 AND sample <= 1),
    started_by TEXT    NOT NULL,
    started_at INTEGER NOT NULL
) STRICT;

-- What each instance has counted for a shadow, as one JSON report (the API merges them).
CREATE TABLE shadow_reports (
    shadow_id  TEXT    NOT NULL,
    instance   TEXT    NOT NULL,
    world      TEXT    NOT NULL,
    report     TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (shadow_id, instance)
) STRICT;

-- A replay of a version (or the draft, `version` NULL) over a world's recorded contexts. A
-- worker claims it and renews `heartbeat_at` with each progress write; a replay whose worker
-- stopped renewing is taken again.
CREATE TABLE replays (
    id           TEXT    NOT NULL PRIMARY KEY,
    world        TEXT    NOT NULL,
    version      INTEGER,
    -- The draft replayed, as it was when the replay was requested.
    model        TEXT    NOT NULL,
    since        INTEGER,
    row_limit    INTEGER NOT NULL CHECK (row_limit > 0),
    status       TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    processed    INTEGER NOT NULL DEFAULT 0,
    report       TEXT,
    error        TEXT,
    requested_by TEXT    NOT NULL,
    requested_at INTEGER NOT NULL,
    claimed_by   TEXT,
    heartbeat_at INTEGER,
    finished_at  INTEGER
) STRICT;
CREATE INDEX replays_by_world ON replays (world, requested_at);
CREATE INDEX replays_unfinished ON replays (requested_at) WHERE status IN ('queued', 'running');
