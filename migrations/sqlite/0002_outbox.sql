-- The transactional outbox (SPEC §6), the idempotency ledger of its handlers, deploy
-- generations, and the tables the first handlers write: decision statistics and webhook
-- subscriptions. Expand-only: nothing the previous generation uses changes.
--
-- Times are INTEGER microseconds since the Unix epoch; JSON is TEXT.

CREATE TABLE generations (
    generation INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at INTEGER NOT NULL,
    git_sha    TEXT    NOT NULL DEFAULT '',
    note       TEXT    NOT NULL DEFAULT ''
);

CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_type      TEXT    NOT NULL,
    event_version   INTEGER NOT NULL DEFAULT 1,
    occurred_at     INTEGER NOT NULL,
    source          TEXT    NOT NULL,
    target          TEXT,
    channel         TEXT    NOT NULL,
    generation      INTEGER NOT NULL,
    world           TEXT,
    payload         TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    trace_context   TEXT,
    status          TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'in_flight', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    available_at    INTEGER NOT NULL,
    claimed_at      INTEGER,
    claimed_by      TEXT,
    last_error      TEXT,
    failure_history TEXT    NOT NULL DEFAULT '[]',
    first_failed_at INTEGER,
    UNIQUE (event_type, idempotency_key)
) STRICT;

CREATE INDEX outbox_claimable ON outbox (generation, available_at, id) WHERE status = 'pending';
CREATE INDEX outbox_in_flight ON outbox (claimed_at) WHERE status = 'in_flight';
CREATE INDEX outbox_failed ON outbox (generation, id) WHERE status = 'failed';

CREATE TABLE event_handled (
    handler         TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    outbox_id       INTEGER NOT NULL,
    handled_at      INTEGER NOT NULL,
    PRIMARY KEY (handler, idempotency_key)
) STRICT;

CREATE TABLE decision_stats (
    world  TEXT    NOT NULL,
    rule   TEXT    NOT NULL,
    status TEXT    NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (world, rule, status)
) STRICT;

CREATE TABLE webhooks (
    id         TEXT    NOT NULL PRIMARY KEY,
    world      TEXT    NOT NULL REFERENCES worlds (slug),
    url        TEXT    NOT NULL,
    secret     TEXT    NOT NULL,
    events     TEXT    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE INDEX webhooks_by_world ON webhooks (world);
