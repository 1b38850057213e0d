-- The initial Postgres schema, all in schema `core`: worlds, their immutable versions and
-- write-once modules, deployments, API keys and the per-world hash chains of decision records.

CREATE SCHEMA IF NOT EXISTS core;

CREATE TABLE core.worlds (
    slug             text        NOT NULL PRIMARY KEY,
    -- The working copy an author edits; NULL until one is saved.
    draft            jsonb,
    deployed_version bigint,
    created_at       timestamptz NOT NULL
);

CREATE TABLE core.world_versions (
    world        text        NOT NULL REFERENCES core.worlds (slug),
    version      bigint      NOT NULL CHECK (version > 0),
    model        jsonb       NOT NULL,
    published_at timestamptz NOT NULL,
    published_by text        NOT NULL,
    PRIMARY KEY (world, version)
);

ALTER TABLE core.worlds
    ADD CONSTRAINT worlds_deployed_version_fkey
    FOREIGN KEY (slug, deployed_version) REFERENCES core.world_versions (world, version);

CREATE TABLE core.modules (
    -- `sha256:<hex>` of `content`.
    hash       text        NOT NULL PRIMARY KEY,
    content    bytea       NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE TABLE core.version_modules (
    world       text    NOT NULL,
    version     bigint  NOT NULL,
    -- The action's place in the model's action order.
    position    integer NOT NULL,
    action      text    NOT NULL,
    module_hash text    NOT NULL REFERENCES core.modules (hash),
    PRIMARY KEY (world, version, position),
    UNIQUE (world, version, action),
    FOREIGN KEY (world, version) REFERENCES core.world_versions (world, version)
);

-- Every deployment of a world, oldest first; a rollback is a deployment of an older version.
CREATE TABLE core.world_deployments (
    world       text        NOT NULL REFERENCES core.worlds (slug),
    seq         bigint      NOT NULL CHECK (seq > 0),
    version     bigint      NOT NULL,
    deployed_at timestamptz NOT NULL,
    deployed_by text        NOT NULL,
    PRIMARY KEY (world, seq),
    FOREIGN KEY (world, version) REFERENCES core.world_versions (world, version)
);

CREATE TABLE core.api_keys (
    id          text        NOT NULL PRIMARY KEY,
    -- Lower-case hex sha256 of the secret; the secret itself is never stored.
    secret_hash text        NOT NULL UNIQUE,
    -- NULL for an operator key (every world). Keys may name a world before it has a row.
    world       text,
    scopes      text[]      NOT NULL,
    label       text        NOT NULL,
    created_at  timestamptz NOT NULL
);

-- The decision log. No foreign key to worlds: the log must accept every decision the service
-- made, and an audit trail should not depend on other tables' rows staying in place.
CREATE TABLE core.decisions (
    world          text        NOT NULL,
    seq            bigint      NOT NULL CHECK (seq > 0),
    decision_id    text        NOT NULL UNIQUE,
    version        bigint      NOT NULL,
    action         text        NOT NULL,
    module_hash    text        NOT NULL,
    status         text        NOT NULL,
    -- The exact JSON text that was hashed. Not jsonb: jsonb normalizes numbers (-0.0 becomes
    -- 0.0), which would change the bytes an auditor hashes.
    matched_rules  text        NOT NULL,
    caller         text        NOT NULL,
    correlation_id text,
    context_digest text        NOT NULL,
    decided_at     timestamptz NOT NULL,
    prev_hash      text        NOT NULL,
    hash           text        NOT NULL,
    PRIMARY KEY (world, seq)
);

-- The last record of each world's chain. Appenders lock the row (SELECT … FOR UPDATE) for
-- their transaction, so writers on every instance extend one chain, one after another.
CREATE TABLE core.decision_chain_heads (
    world text   NOT NULL PRIMARY KEY,
    seq   bigint NOT NULL,
    hash  text   NOT NULL
);

-- Published versions, their modules and the decision log are never changed once written; the
-- code never tries, and this trigger makes a mistake fail loudly instead of rewriting history.
CREATE FUNCTION core.reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% on %.% is not allowed: its rows are immutable',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME;
END
$$;

CREATE TRIGGER world_versions_immutable BEFORE UPDATE OR DELETE ON core.world_versions
    FOR EACH ROW EXECUTE FUNCTION core.reject_change();
CREATE TRIGGER version_modules_immutable BEFORE UPDATE OR DELETE ON core.version_modules
    FOR EACH ROW EXECUTE FUNCTION core.reject_change();
CREATE TRIGGER modules_immutable BEFORE UPDATE OR DELETE ON core.modules
    FOR EACH ROW EXECUTE FUNCTION core.reject_change();
CREATE TRIGGER decisions_immutable BEFORE UPDATE OR DELETE ON core.decisions
    FOR EACH ROW EXECUTE FUNCTION core.reject_change();
