-- Capacity fallback. A pool lists the offerings to fall back to, in order, after its own
-- shape has no room: each an instance type, a provider config, or both.
ALTER TABLE pools ADD COLUMN fallbacks JSONB NOT NULL DEFAULT '[]';

-- Where an instance's machine is made (a zone of its provider config); NULL: the
-- provider's own choice.
ALTER TABLE instances ADD COLUMN placement TEXT;

-- Offerings that failed for lack of capacity, skipped by every worker until `until`.
-- `placement` is '' for an offering with no placement.
CREATE TABLE unavailable_offerings (
    provider_name TEXT NOT NULL,
    instance_type TEXT NOT NULL,
    placement TEXT NOT NULL DEFAULT '',
    until TIMESTAMPTZ NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (provider_name, instance_type, placement)
);
