-- Retention (docs/operations.md, "Retention"): the indexes that serve `/health`'s outbox
-- counts and the pruning of delivered rows, and the one controlled path by which decision
-- records leave the log: a range is exported first (recorded in `decision_exports`), then a
-- checkpoint of its last link is kept (`decision_checkpoints`), and only records at or below
-- that checkpoint may be deleted. Expand-only: the previous build reads none of this, and the
-- delete trigger it relied on is replaced by one that refuses every delete it ever made.
--
-- Times are INTEGER microseconds since the Unix epoch.

-- `/health` counts the rows not yet delivered; delivered rows (nearly all of them) are not in
-- this index, so the count costs what is outstanding, not what the table holds.
CREATE INDEX outbox_undelivered ON outbox (generation, status, occurred_at)
    WHERE status <> 'delivered';
-- Retention takes the oldest delivered rows, a batch at a time.
CREATE INDEX outbox_delivered ON outbox (occurred_at, id) WHERE status = 'delivered';
-- A pruned row's idempotency entries go with it.
CREATE INDEX event_handled_by_outbox ON event_handled (outbox_id);

-- Every export of a range of a world's chain, as `spectral audit export` wrote it.
CREATE TABLE decision_exports (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    world       TEXT    NOT NULL,
    first_seq   INTEGER NOT NULL CHECK (first_seq > 0),
    last_seq    INTEGER NOT NULL,
    -- The hash of record `last_seq`: the link the file ends on.
    last_hash   TEXT    NOT NULL,
    -- `sha256:<hex>` of the file.
    file_digest TEXT    NOT NULL,
    exported_at INTEGER NOT NULL,
    CHECK (last_seq >= first_seq)
) STRICT;

CREATE INDEX decision_exports_by_world ON decision_exports (world, first_seq, last_seq);

-- The last link pruned from each world's chain: verification of what remains starts here.
CREATE TABLE decision_checkpoints (
    world     TEXT    NOT NULL PRIMARY KEY,
    seq       INTEGER NOT NULL CHECK (seq > 0),
    hash      TEXT    NOT NULL,
    pruned_at INTEGER NOT NULL
) STRICT;

CREATE TRIGGER decision_exports_immutable BEFORE UPDATE ON decision_exports
BEGIN SELECT RAISE(ABORT, 'decision exports are append-only'); END;
CREATE TRIGGER decision_exports_undeletable BEFORE DELETE ON decision_exports
BEGIN SELECT RAISE(ABORT, 'decision exports are append-only'); END;

-- A checkpoint names a stored record by its true hash, and every record up to it has been
-- exported; it only moves forward, over exported records, and is never removed.
CREATE TRIGGER decision_checkpoints_exported BEFORE INSERT ON decision_checkpoints
WHEN NOT EXISTS (SELECT 1 FROM decision_exports e
                 WHERE e.world = NEW.world AND e.first_seq = 1 AND e.last_seq >= NEW.seq)
  OR NOT EXISTS (SELECT 1 FROM decisions d
                 WHERE d.world = NEW.world AND d.seq = NEW.seq AND d.hash = NEW.hash)
BEGIN SELECT RAISE(ABORT, 'a decision checkpoint must name a stored record whose range was exported'); END;
CREATE TRIGGER decision_checkpoints_advance BEFORE UPDATE ON decision_checkpoints
WHEN NEW.world <> OLD.world OR NEW.seq < OLD.seq
  OR NOT EXISTS (SELECT 1 FROM decision_exports e
                 WHERE e.world = NEW.world AND e.first_seq <= OLD.seq + 1
                   AND e.last_seq >= NEW.seq)
  OR NOT EXISTS (SELECT 1 FROM decisions d
                 WHERE d.world = NEW.world AND d.seq = NEW.seq AND d.hash = NEW.hash)
BEGIN SELECT RAISE(ABORT, 'a decision checkpoint only moves forward over exported records'); END;
CREATE TRIGGER decision_checkpoints_undeletable BEFORE DELETE ON decision_checkpoints
BEGIN SELECT RAISE(ABORT, 'decision checkpoints are never removed'); END;

-- Decision records stay append-only, except those at or below their world's checkpoint.
DROP TRIGGER decisions_undeletable;
CREATE TRIGGER decisions_undeletable BEFORE DELETE ON decisions
WHEN NOT EXISTS (SELECT 1 FROM decision_checkpoints c
                 WHERE c.world = OLD.world AND OLD.seq <= c.seq)
BEGIN SELECT RAISE(ABORT, 'decision records are append-only: only an exported range at or below its checkpoint may be pruned'); END;
