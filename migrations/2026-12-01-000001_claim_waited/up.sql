-- A runner that does not lead the claims of its kinds (src/queue/runner.rs) takes only
-- jobs that have waited, runnable for at least `waited_seconds`: the claim learns how
-- long. The claim of four arguments stays, as this one with nothing to wait for, for
-- the workers of the release before while a deployment rolls.
CREATE FUNCTION claim_jobs(worker TEXT, lease_seconds DOUBLE PRECISION, kinds TEXT[], n BIGINT,
                           waited_seconds DOUBLE PRECISION)
RETURNS TABLE (id BIGINT, kind TEXT, instance_id UUID, attempts INTEGER, created_at TIMESTAMPTZ)
LANGUAGE plpgsql
SET enable_sort = off
SET enable_seqscan = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    UPDATE jobs AS j
    SET locked_by = worker,
        locked_until = now() + lease_seconds * interval '1 second',
        attempts = j.attempts + 1
    -- An array, not a join: the rows taken are then updated through the primary key,
    -- never found again by a scan of the table.
    WHERE j.id = ANY (ARRAY(
        SELECT c.id FROM jobs AS c
        WHERE c.status = 'queued' AND c.kind = ANY (kinds)
          AND c.run_at <= now() - waited_seconds * interval '1 second'
          AND (c.locked_until IS NULL OR c.locked_until < now())
        ORDER BY c.run_at, c.id
        LIMIT n
        FOR UPDATE SKIP LOCKED))
    RETURNING j.id, j.kind, j.instance_id, j.attempts, j.created_at;
END
$$;

CREATE OR REPLACE FUNCTION claim_jobs(worker TEXT, lease_seconds DOUBLE PRECISION, kinds TEXT[], n BIGINT)
RETURNS TABLE (id BIGINT, kind TEXT, instance_id UUID, attempts INTEGER, created_at TIMESTAMPTZ)
LANGUAGE sql
AS $$
    SELECT * FROM claim_jobs(worker, lease_seconds, kinds, n, 0)
$$;
