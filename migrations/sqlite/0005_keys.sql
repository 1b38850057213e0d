-- The life cycle of API keys (docs/operations.md, "Keys"): an optional expiry, revocation,
-- rotation with an overlap during which the replaced secret is still accepted, and when a key
-- was last used. Expand-only: builds before this one read none of these columns. A revocation
-- also replaces `secret_hash` with a value no secret hashes to, so that such a build refuses a
-- revoked key as well; it ignores expiry and sees only a rotated key's new secret.
-- Times are integer microseconds, as everywhere in this dialect.

ALTER TABLE api_keys ADD COLUMN expires_at INTEGER;
ALTER TABLE api_keys ADD COLUMN revoked_at INTEGER;
-- Recorded at most about once a minute per key, off the decide path.
ALTER TABLE api_keys ADD COLUMN last_used_at INTEGER;
-- The secret the last rotation replaced, accepted until `previous_valid_until`.
ALTER TABLE api_keys ADD COLUMN previous_secret_hash TEXT;
ALTER TABLE api_keys ADD COLUMN previous_valid_until INTEGER;

CREATE UNIQUE INDEX api_keys_previous_secret ON api_keys (previous_secret_hash);
