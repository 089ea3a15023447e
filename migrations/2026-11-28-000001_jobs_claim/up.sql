-- A claim takes the oldest runnable jobs in (run_at, id) order: this index holds that
-- order, so a claim reads the few rows it takes instead of sorting every queued one.
DROP INDEX jobs_runnable;
CREATE INDEX jobs_claimable ON jobs (run_at, id) WHERE status = 'queued';

-- The claim, as one function. A job table swings between empty and thousands of rows
-- faster than its statistics follow, and a plan made while it looked empty (a scan of
-- every queued row, then a sort) was kept by every connection that had prepared it. With
-- sorts and sequential scans off for this statement only, its plan walks jobs_claimable
-- and stops after `n` rows, whatever the statistics say.
CREATE FUNCTION claim_jobs(worker TEXT, lease_seconds DOUBLE PRECISION, kinds TEXT[], n BIGINT)
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
        WHERE c.status = 'queued' AND c.kind = ANY (kinds) AND c.run_at <= now()
          AND (c.locked_until IS NULL OR c.locked_until < now())
        ORDER BY c.run_at, c.id
        LIMIT n
        FOR UPDATE SKIP LOCKED))
    RETURNING j.id, j.kind, j.instance_id, j.attempts, j.created_at;
END
$$;
