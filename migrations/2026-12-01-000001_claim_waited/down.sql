DROP FUNCTION claim_jobs(TEXT, DOUBLE PRECISION, TEXT[], BIGINT);
DROP FUNCTION claim_jobs(TEXT, DOUBLE PRECISION, TEXT[], BIGINT, DOUBLE PRECISION);

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
