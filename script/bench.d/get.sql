-- What one cached-token GET /instances?limit=10 asks of Postgres (a token's newest ten
-- instances and one more, to know whether a next page exists), for `pgbench -M
-- prepared`: a reference that reads what the GET reads. Token ids come from -D first/last.
\set token random(:first, :last)
SELECT "instances"."id", "instances"."owner_token_id", "instances"."provider_name", "instances"."image", "instances"."instance_type", "instances"."public_ssh_key", "instances"."state", "instances"."ip_address", "instances"."upstream_id", "instances"."error_reason", "instances"."idempotency_key", "instances"."created_at", "instances"."updated_at", "instances"."terminated_at", "instances"."details", "instances"."expires_at", "instances"."pool_name", "instances"."assigned_at", "instances"."placement", "instances"."asked", "instances"."key_pending_since" FROM "instances" WHERE ("instances"."owner_token_id" = :token) ORDER BY "instances"."created_at" DESC, "instances"."id" DESC LIMIT 11;
