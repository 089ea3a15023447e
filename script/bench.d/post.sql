-- What one POST /instances asks of Postgres (a fake provider, no pool, no key, no
-- Idempotency-Key), statement for statement, for `pgbench -M prepared`: the reference
-- that script/bench holds the API's POST rate against. The http process remembers what
-- the provider offers for the image (broker::providers::OfferCache), so a POST is this one
-- statement, written only where the catalog is still at the version it remembers. Token
-- ids come from -D first/last, that version from -D version.
\set token random(:first, :last)
WITH inserted AS ( INSERT INTO instances (id, owner_token_id, provider_name, image, instance_type, public_ssh_key, state, idempotency_key, pool_name, expires_at) SELECT gen_random_uuid(), :token, 'fake', 'bench', 'standard', NULL, 'creating', NULL, NULL, now() + interval '3 hours' WHERE :version::int8 IS NULL OR :version::int8 = (SELECT version FROM catalog_version) ON CONFLICT (owner_token_id, idempotency_key) DO NOTHING RETURNING *), event AS ( INSERT INTO instance_events (instance_id, to_state) SELECT id, state FROM inserted), job AS ( INSERT INTO jobs (kind, instance_id) SELECT 'create', id FROM inserted) SELECT inserted.* FROM inserted;
