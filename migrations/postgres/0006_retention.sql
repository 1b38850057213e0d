-- Retention (docs/operations.md, "Retention"): the indexes that serve `/health`'s outbox
-- counts and the pruning of delivered rows, and the one controlled path by which decision
-- records leave the log: a range is exported first (recorded in `decision_exports`), then a
-- checkpoint of its last link is kept (`decision_checkpoints`), and only records at or below
-- that checkpoint may be deleted. Expand-only: the previous build reads none of this, and the
-- delete trigger it relied on is replaced by one that refuses every delete it ever made.

-- `/health` counts the rows not yet delivered; delivered rows (nearly all of them) are not in
-- this index, so the count costs what is outstanding, not what the table holds.
CREATE INDEX outbox_undelivered ON core.outbox (generation, status, occurred_at)
    WHERE status <> 'delivered';
-- Retention takes the oldest delivered rows, a batch at a time.
CREATE INDEX outbox_delivered ON core.outbox (occurred_at, id) WHERE status = 'delivered';
-- A pruned row's idempotency entries go with it.
CREATE INDEX event_handled_by_outbox ON core.event_handled (outbox_id);

-- Every export of a range of a world's chain, as `spectral audit export` wrote it.
CREATE TABLE core.decision_exports (
    id          bigserial   PRIMARY KEY,
    world       text        NOT NULL,
    first_seq   bigint      NOT NULL CHECK (first_seq > 0),
    last_seq    bigint      NOT NULL,
    -- The hash of record `last_seq`: the link the file ends on.
    last_hash   text        NOT NULL,
    -- `sha256:<hex>` of the file.
    file_digest text        NOT NULL,
    exported_at timestamptz NOT NULL,
    CHECK (last_seq >= first_seq)
);

CREATE INDEX decision_exports_by_world ON core.decision_exports (world, first_seq, last_seq);

-- The last link pruned from each world's chain: verification of what remains starts here.
CREATE TABLE core.decision_checkpoints (
    world     text        NOT NULL PRIMARY KEY,
    seq       bigint      NOT NULL CHECK (seq > 0),
    hash      text        NOT NULL,
    pruned_at timestamptz NOT NULL
);

CREATE TRIGGER decision_exports_immutable BEFORE UPDATE OR DELETE ON core.decision_exports
    FOR EACH ROW EXECUTE FUNCTION core.reject_change();
CREATE TRIGGER decision_checkpoints_undeletable BEFORE DELETE ON core.decision_checkpoints
    FOR EACH ROW EXECUTE FUNCTION core.reject_change();

-- A checkpoint names a stored record by its true hash, and every record up to it has been
-- exported; it only moves forward, over exported records, and is never removed.
CREATE FUNCTION core.check_decision_checkpoint() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    from_seq bigint := 1;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.world <> OLD.world OR NEW.seq < OLD.seq THEN
            RAISE EXCEPTION 'a decision checkpoint only moves forward (world %, % to %)',
                OLD.world, OLD.seq, NEW.seq;
        END IF;
        from_seq := OLD.seq + 1;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM core.decision_exports e
                   WHERE e.world = NEW.world AND e.first_seq <= from_seq
                     AND e.last_seq >= NEW.seq) THEN
        RAISE EXCEPTION 'records % to % of world % were not exported', from_seq, NEW.seq,
            NEW.world;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM core.decisions d
                   WHERE d.world = NEW.world AND d.seq = NEW.seq AND d.hash = NEW.hash) THEN
        RAISE EXCEPTION 'a decision checkpoint must name a stored record by its hash';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER decision_checkpoints_exported BEFORE INSERT OR UPDATE
    ON core.decision_checkpoints
    FOR EACH ROW EXECUTE FUNCTION core.check_decision_checkpoint();

-- Decision records stay append-only, except those at or below their world's checkpoint.
CREATE FUNCTION core.guard_decision_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM core.decision_checkpoints c
                   WHERE c.world = OLD.world AND OLD.seq <= c.seq) THEN
        RAISE EXCEPTION 'decision records are append-only: record % of world % is above its '
            'checkpoint and may not be deleted', OLD.seq, OLD.world;
    END IF;
    RETURN OLD;
END
$$;

DROP TRIGGER decisions_immutable ON core.decisions;
CREATE TRIGGER decisions_immutable BEFORE UPDATE ON core.decisions
    FOR EACH ROW EXECUTE FUNCTION core.reject_change();
CREATE TRIGGER decisions_prunable BEFORE DELETE ON core.decisions
    FOR EACH ROW EXECUTE FUNCTION core.guard_decision_delete();
