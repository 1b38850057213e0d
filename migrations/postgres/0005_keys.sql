-- The life cycle of API keys (docs/operations.md, "Keys"): an optional expiry, revocation,
-- rotation with an overlap during which the replaced secret is still accepted, and when a key
-- was last used. Expand-only: builds before this one read none of these columns. A revocation
-- also replaces `secret_hash` with a value no secret hashes to, so that such a build refuses a
-- revoked key as well; it ignores expiry and sees only a rotated key's new secret.

ALTER TABLE core.api_keys
    ADD COLUMN expires_at           timestamptz,
    ADD COLUMN revoked_at           timestamptz,
    -- Recorded at most about once a minute per key, off the decide path.
    ADD COLUMN last_used_at         timestamptz,
    -- The secret the last rotation replaced, accepted until `previous_valid_until`.
    ADD COLUMN previous_secret_hash text,
    ADD COLUMN previous_valid_until timestamptz;

CREATE UNIQUE INDEX api_keys_previous_secret ON core.api_keys (previous_secret_hash);
