-- What one POST /instances asks of Postgres (a fake provider, no pool, no key, no
-- Idempotency-Key), statement for statement, for `pgbench -M prepared`: the reference
-- that script/bench holds the API's POST rate against. Token ids come from -D first/last.
\set token random(:first, :last)
SELECT "providers"."id", "providers"."name", "providers"."type", "providers"."config", "providers"."created_at", "providers"."offer", "providers"."updated_at", "providers"."secret_refs", "providers"."max_lifetime_secs", "providers"."fallbacks" FROM "providers" WHERE ("providers"."name" = 'fake') LIMIT 1;
SELECT "pools"."name", "pools"."provider_name", "pools"."image", "pools"."instance_type", "pools"."min_idle", "pools"."max_size", "pools"."max_lifetime_secs", "pools"."created_at", "pools"."updated_at", "pools"."fallbacks" FROM "pools" WHERE ((("pools"."provider_name" = 'fake') AND ("pools"."image" = 'bench')) AND ("pools"."instance_type" = 'standard')) ORDER BY "pools"."name" LIMIT 1;
BEGIN;
INSERT INTO "instances" ("id", "owner_token_id", "provider_name", "image", "instance_type", "public_ssh_key", "state", "idempotency_key", "pool_name", "expires_at") VALUES (gen_random_uuid(), :token, 'fake', 'bench', 'standard', DEFAULT, 'creating', DEFAULT, DEFAULT, (CURRENT_TIMESTAMP + interval '3 hours')) ON CONFLICT ("owner_token_id", "idempotency_key") DO NOTHING RETURNING "instances"."id", "instances"."owner_token_id", "instances"."provider_name", "instances"."image", "instances"."instance_type", "instances"."public_ssh_key", "instances"."state", "instances"."ip_address", "instances"."upstream_id", "instances"."error_reason", "instances"."idempotency_key", "instances"."created_at", "instances"."updated_at", "instances"."terminated_at", "instances"."details", "instances"."expires_at", "instances"."pool_name", "instances"."assigned_at", "instances"."placement", "instances"."asked", "instances"."key_pending_since" \gset
INSERT INTO "instance_events" ("instance_id", "from_state", "to_state", "reason") VALUES (:id, DEFAULT, 'creating', DEFAULT);
INSERT INTO "jobs" ("kind", "instance_id") VALUES ('create', :id);
SELECT pg_notify('cloudbrain_jobs', 'create');
COMMIT;
