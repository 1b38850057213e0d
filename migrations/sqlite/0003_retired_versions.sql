-- Retired versions: a version taken out of service for good (after a rollback from it, or
-- before it was ever deployed), so that no key can pin it and it cannot be deployed again.
-- Versions are immutable, so retirement is a row of its own. Expand-only: builds before this
-- one never read the table; the trigger below keeps even them from deploying a retired version.

CREATE TABLE retired_versions (
    world      TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    retired_at INTEGER NOT NULL,
    -- The key id that retired it.
    retired_by TEXT    NOT NULL,
    reason     TEXT,
    PRIMARY KEY (world, version),
    FOREIGN KEY (world, version) REFERENCES world_versions (world, version)
) STRICT;

-- Retirement is permanent.
CREATE TRIGGER retired_versions_immutable BEFORE UPDATE ON retired_versions
BEGIN SELECT RAISE(ABORT, 'retired versions stay retired'); END;
CREATE TRIGGER retired_versions_undeletable BEFORE DELETE ON retired_versions
BEGIN SELECT RAISE(ABORT, 'retired versions stay retired'); END;

-- A backstop for every build: a retired version is never deployed again.
CREATE TRIGGER world_deployments_not_retired BEFORE INSERT ON world_deployments
WHEN EXISTS (SELECT 1 FROM retired_versions r WHERE r.world = NEW.world AND r.version = NEW.version)
BEGIN SELECT RAISE(ABORT, 'the version is retired and cannot be deployed'); END;
