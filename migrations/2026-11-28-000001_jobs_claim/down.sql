DROP FUNCTION claim_jobs(TEXT, DOUBLE PRECISION, TEXT[], BIGINT);
DROP INDEX jobs_claimable;
CREATE INDEX jobs_runnable ON jobs (run_at) WHERE status = 'queued';
