-- What a provider says of a machine beyond the contract, by name: EC2's ECS membership
-- becomes {"ecs": …}, so the column serves every provider.
ALTER TABLE instances RENAME COLUMN ecs TO details;
UPDATE instances SET details = jsonb_build_object('ecs', details) WHERE details IS NOT NULL;
