-- A pool is a named shape of machine kept warm: `min_idle` booted and unassigned, never
-- more than `max_size` live instances in all (idle, busy and booting).
CREATE TABLE pools (
    name TEXT PRIMARY KEY,
    provider_name TEXT NOT NULL REFERENCES providers (name),
    image TEXT NOT NULL,
    instance_type TEXT NOT NULL,
    min_idle INTEGER NOT NULL DEFAULT 0 CHECK (min_idle >= 0),
    max_size INTEGER NOT NULL CHECK (max_size >= 1),
    max_lifetime_secs BIGINT CHECK (max_lifetime_secs > 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (min_idle <= max_size)
);

-- An idle pool instance belongs to no token until a request takes it.
ALTER TABLE instances ALTER COLUMN owner_token_id DROP NOT NULL;
ALTER TABLE instances ADD COLUMN pool_name TEXT REFERENCES pools (name) ON DELETE SET NULL;
ALTER TABLE instances ADD COLUMN assigned_at TIMESTAMPTZ;
CREATE INDEX instances_pool_live ON instances (pool_name, state) WHERE pool_name IS NOT NULL;
