-- The initial SQLite schema: worlds, their immutable versions and write-once modules,
-- deployments, API keys and the per-world hash chains of decision records.
--
-- Times are INTEGER microseconds since the Unix epoch (UTC): exact, ordered, and the same
-- precision as Postgres `timestamptz`. JSON is TEXT. Tables are STRICT so that a value of the
-- wrong type is an error instead of being stored as whatever it happens to be.

CREATE TABLE worlds (
    slug             TEXT    NOT NULL PRIMARY KEY,
    -- The working copy an author edits; NULL until one is saved.
    draft            TEXT,
    deployed_version INTEGER,
    created_at       INTEGER NOT NULL,
    -- SQLite resolves foreign keys when rows change, so this may name a table created below.
    FOREIGN KEY (slug, deployed_version) REFERENCES world_versions (world, version)
) STRICT;

CREATE TABLE world_versions (
    world        TEXT    NOT NULL REFERENCES worlds (slug),
    version      INTEGER NOT NULL CHECK (version > 0),
    model        TEXT    NOT NULL,
    published_at INTEGER NOT NULL,
    published_by TEXT    NOT NULL,
    PRIMARY KEY (world, version)
) STRICT;

CREATE TABLE modules (
    -- `sha256:<hex>` of `content`.
    hash       TEXT    NOT NULL PRIMARY KEY,
    content    BLOB    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE version_modules (
    world       TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    -- The action's place in the model's action order.
    position    INTEGER NOT NULL,
    action      TEXT    NOT NULL,
    module_hash TEXT    NOT NULL REFERENCES modules (hash),
    PRIMARY KEY (world, version, position),
    UNIQUE (world, version, action),
    FOREIGN KEY (world, version) REFERENCES world_versions (world, version)
) STRICT;

-- Every deployment of a world, oldest first; a rollback is a deployment of an older version.
CREATE TABLE world_deployments (
    world       TEXT    NOT NULL REFERENCES worlds (slug),
    seq         INTEGER NOT NULL CHECK (seq > 0),
    version     INTEGER NOT NULL,
    deployed_at INTEGER NOT NULL,
    deployed_by TEXT    NOT NULL,
    PRIMARY KEY (world, seq),
    FOREIGN KEY (world, version) REFERENCES world_versions (world, version)
) STRICT;

CREATE TABLE api_keys (
    id          TEXT    NOT NULL PRIMARY KEY,
    -- Lower-case hex sha256 of the secret; the secret itself is never stored.
    secret_hash TEXT    NOT NULL UNIQUE,
    -- NULL for an operator key (every world). Keys may name a world before it has a row.
    world       TEXT,
    -- Comma-separated scope names.
    scopes      TEXT    NOT NULL,
    label       TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

-- The decision log. No foreign key to worlds: the log must accept every decision the service
-- made, and an audit trail should not depend on other tables' rows staying in place.
CREATE TABLE decisions (
    world          TEXT    NOT NULL,
    seq            INTEGER NOT NULL CHECK (seq > 0),
    decision_id    TEXT    NOT NULL UNIQUE,
    version        INTEGER NOT NULL,
    action         TEXT    NOT NULL,
    module_hash    TEXT    NOT NULL,
    status         TEXT    NOT NULL,
    -- The exact JSON text that was hashed.
    matched_rules  TEXT    NOT NULL,
    caller         TEXT    NOT NULL,
    correlation_id TEXT,
    context_digest TEXT    NOT NULL,
    decided_at     INTEGER NOT NULL,
    prev_hash      TEXT    NOT NULL,
    hash           TEXT    NOT NULL,
    PRIMARY KEY (world, seq)
) STRICT;

-- The last record of each world's chain, read and advanced inside the appending transaction.
CREATE TABLE decision_chain_heads (
    world TEXT    NOT NULL PRIMARY KEY,
    seq   INTEGER NOT NULL,
    hash  TEXT    NOT NULL
) STRICT;

-- Published versions, their modules and the decision log are never changed once written; the
-- code never tries, and these triggers make a mistake fail loudly instead of rewriting history.
CREATE TRIGGER world_versions_immutable BEFORE UPDATE ON world_versions
BEGIN SELECT RAISE(ABORT, 'world versions are immutable'); END;
CREATE TRIGGER world_versions_undeletable BEFORE DELETE ON world_versions
BEGIN SELECT RAISE(ABORT, 'world versions are immutable'); END;
CREATE TRIGGER version_modules_immutable BEFORE UPDATE ON version_modules
BEGIN SELECT RAISE(ABORT, 'version modules are immutable'); END;
CREATE TRIGGER version_modules_undeletable BEFORE DELETE ON version_modules
BEGIN SELECT RAISE(ABORT, 'version modules are immutable'); END;
CREATE TRIGGER modules_immutable BEFORE UPDATE ON modules
BEGIN SELECT RAISE(ABORT, 'modules are write-once'); END;
CREATE TRIGGER modules_undeletable BEFORE DELETE ON modules
BEGIN SELECT RAISE(ABORT, 'modules are write-once'); END;
CREATE TRIGGER decisions_immutable BEFORE UPDATE ON decisions
BEGIN SELECT RAISE(ABORT, 'decision records are append-only'); END;
CREATE TRIGGER decisions_undeletable BEFORE DELETE ON decisions
BEGIN SELECT RAISE(ABORT, 'decision records are append-only'); END;
