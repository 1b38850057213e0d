-- Retired versions: a version taken out of service for good (after a rollback from it, or
-- before it was ever deployed), so that no key can pin it and it cannot be deployed again.
-- Versions are immutable, so retirement is a row of its own. Expand-only: builds before this
-- one never read the table; the trigger below keeps even them from deploying a retired version.

CREATE TABLE core.retired_versions (
    world      text        NOT NULL,
    version    bigint      NOT NULL,
    retired_at timestamptz NOT NULL,
    -- The key id that retired it.
    retired_by text        NOT NULL,
    reason     text,
    PRIMARY KEY (world, version),
    FOREIGN KEY (world, version) REFERENCES core.world_versions (world, version)
);

-- Retirement is permanent.
CREATE TRIGGER retired_versions_permanent BEFORE UPDATE OR DELETE ON core.retired_versions
    FOR EACH ROW EXECUTE FUNCTION core.reject_change();

-- A backstop for every build: a retired version is never deployed again.
CREATE FUNCTION core.reject_retired_deployment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM core.retired_versions r
               WHERE r.world = NEW.world AND r.version = NEW.version) THEN
        RAISE EXCEPTION 'world % version % is retired and cannot be deployed',
            NEW.world, NEW.version;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER world_deployments_not_retired BEFORE INSERT ON core.world_deployments
    FOR EACH ROW EXECUTE FUNCTION core.reject_retired_deployment();
