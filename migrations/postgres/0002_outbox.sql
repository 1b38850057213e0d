-- The transactional outbox (SPEC §6), the idempotency ledger of its handlers, deploy
-- generations, and the tables the first handlers write: decision statistics and webhook
-- subscriptions. Expand-only: nothing the previous generation uses changes.

CREATE TABLE core.generations (
    generation bigserial   PRIMARY KEY,
    started_at timestamptz NOT NULL,
    git_sha    text        NOT NULL DEFAULT '',
    note       text        NOT NULL DEFAULT ''
);

CREATE TABLE core.outbox (
    id              bigserial   PRIMARY KEY,
    event_type      text        NOT NULL,
    event_version   integer     NOT NULL DEFAULT 1,
    occurred_at     timestamptz NOT NULL,
    source          text        NOT NULL,
    -- NULL: for every handler of the event type.
    target          text,
    -- The NOTIFY channel the insert trigger signals.
    channel         text        NOT NULL,
    generation      bigint      NOT NULL,
    world           text,
    payload         jsonb       NOT NULL,
    idempotency_key text        NOT NULL,
    trace_context   text,
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'in_flight', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    available_at    timestamptz NOT NULL,
    claimed_at      timestamptz,
    claimed_by      text,
    last_error      text,
    failure_history jsonb       NOT NULL DEFAULT '[]'::jsonb,
    first_failed_at timestamptz,
    -- A producer that retries its transaction cannot enqueue the same event twice.
    UNIQUE (event_type, idempotency_key)
);

-- What a consumer scans: pending rows of its generation, oldest first.
CREATE INDEX outbox_claimable ON core.outbox (generation, available_at, id) WHERE status = 'pending';
CREATE INDEX outbox_in_flight ON core.outbox (claimed_at) WHERE status = 'in_flight';
CREATE INDEX outbox_failed ON core.outbox (generation, id) WHERE status = 'failed';

-- NOTIFY is a latency hint: the payload is the row id, and consumers poll as well.
CREATE FUNCTION core.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(NEW.channel, NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON core.outbox
    FOR EACH ROW EXECUTE FUNCTION core.outbox_notify();

-- A handler's effect and its row here commit together, so running it twice has one effect.
CREATE TABLE core.event_handled (
    handler         text        NOT NULL,
    idempotency_key text        NOT NULL,
    outbox_id       bigint      NOT NULL,
    handled_at      timestamptz NOT NULL,
    PRIMARY KEY (handler, idempotency_key)
);

-- Decision counts by world, rule and status; rule '*' counts whole decisions.
CREATE TABLE core.decision_stats (
    world  text   NOT NULL,
    rule   text   NOT NULL,
    status text   NOT NULL,
    count  bigint NOT NULL,
    PRIMARY KEY (world, rule, status)
);

CREATE TABLE core.webhooks (
    id         text        PRIMARY KEY,
    world      text        NOT NULL REFERENCES core.worlds (slug),
    url        text        NOT NULL,
    -- The HMAC key; it must be readable to sign deliveries.
    secret     text        NOT NULL,
    -- Comma-separated event types.
    events     text        NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE INDEX webhooks_by_world ON core.webhooks (world);
