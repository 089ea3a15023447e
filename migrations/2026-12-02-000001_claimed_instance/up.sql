-- The instance of a job a claim took, read in the claim's own statement
-- (src/broker/for_workers.rs: `claim_jobs(…) AS c JOIN LATERAL claimed_instance(…)`), so
-- that claiming jobs and reading their rows take one round trip. VOLATILE on purpose:
-- Postgres then runs it with a snapshot of its own, taken after the claim's (a stable or
-- inlined read would share the snapshot the statement began with, older than the claim,
-- and could miss the instance of a job committed in between). A job's instance is written
-- in the job's transaction and never deleted while a job refers to it, so each claimed
-- job finds its row.
CREATE FUNCTION claimed_instance(instance UUID) RETURNS SETOF instances
LANGUAGE sql
VOLATILE
ROWS 1
AS $$
    SELECT * FROM instances WHERE id = instance
$$;
