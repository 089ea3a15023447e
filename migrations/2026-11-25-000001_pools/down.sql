DROP INDEX instances_pool_live;
ALTER TABLE instances DROP COLUMN assigned_at;
ALTER TABLE instances DROP COLUMN pool_name;
DELETE FROM instances WHERE owner_token_id IS NULL;
ALTER TABLE instances ALTER COLUMN owner_token_id SET NOT NULL;
DROP TABLE pools;
