-- A provider config can be changed in place; every worker rebuilds its live provider when
-- this moves.
ALTER TABLE providers ADD COLUMN updated_at TIMESTAMPTZ NOT NULL DEFAULT now();
-- A provider config can be deleted once nothing live uses it; the instances that ran on
-- it keep its name as history.
ALTER TABLE instances DROP CONSTRAINT instances_provider_name_fkey;
