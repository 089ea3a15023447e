-- What a provider config says beyond its cloud's config: the longest an instance on it
-- lives, and the offerings its instances fall back to when it has no room.
ALTER TABLE providers ADD COLUMN max_lifetime_secs BIGINT CHECK (max_lifetime_secs > 0);
ALTER TABLE providers ADD COLUMN fallbacks JSONB NOT NULL DEFAULT '[]';

-- The provider config and instance type an instance was asked for, kept once a capacity
-- fallback moved it elsewhere (its fallbacks are counted from there).
ALTER TABLE instances ADD COLUMN asked JSONB;
