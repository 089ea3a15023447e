//! The Postgres job queue: jobs are rows, enqueued in the caller's transaction so a request
//! is never acknowledged without its job, and announced on a NOTIFY channel at commit.

use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::db::models::NewJob;
use crate::db::schema::jobs;

/// The channel workers LISTEN on; Postgres delivers the NOTIFY only if the enqueue commits.
pub const JOBS_CHANNEL: &str = "cloudbrain_jobs";

crate::text_enum! {
    /// What a job does, stored by name in `jobs.kind`: never rename one.
    pub enum JobKind {
        /// Make the machine for an instance.
        CreateInstance => "create",
        /// Destroy the machine of an instance.
        RemoveInstance => "remove",
    }
}

crate::text_enum! {
    /// Where a job is, stored by name in `jobs.status`.
    pub enum JobStatus {
        /// Waiting to run, running under a lease, or waiting to run again.
        Queued => "queued",
        /// Out of attempts or refused for good; kept for inspection, never run again.
        Dead => "dead",
    }
}

/// Adds a job for `instance_id` on the caller's connection (inside its transaction).
pub async fn enqueue(
    conn: &mut AsyncPgConnection,
    kind: JobKind,
    instance_id: Uuid,
) -> QueryResult<()> {
    diesel::insert_into(jobs::table)
        .values(NewJob { kind, instance_id })
        .execute(conn)
        .await?;
    diesel::sql_query("SELECT pg_notify($1, $2)")
        .bind::<Text, _>(JOBS_CHANNEL)
        .bind::<Text, _>(kind.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes queued jobs of `kind` for `instance_id` that no worker holds a live lease on;
/// returns how many went.
pub async fn drop_unclaimed(
    conn: &mut AsyncPgConnection,
    kind: JobKind,
    instance_id: Uuid,
) -> QueryResult<usize> {
    diesel::delete(
        jobs::table
            .filter(jobs::instance_id.eq(instance_id))
            .filter(jobs::kind.eq(kind))
            .filter(jobs::status.eq(JobStatus::Queued))
            .filter(
                jobs::locked_until
                    .is_null()
                    .or(jobs::locked_until.lt(diesel::dsl::now)),
            ),
    )
    .execute(conn)
    .await
}

/// A job a worker has claimed: its row as the claim left it.
pub type ClaimedJob = crate::db::models::Job;

/// Claims up to `limit` runnable jobs of `kinds` for `worker`, leasing them for `lease`.
///
/// One statement, committed on return: the row locks taken by `FOR UPDATE SKIP LOCKED`
/// last only while it runs, and from then on the lease (`locked_until`) marks ownership,
/// so no transaction or connection is held while the provider is called. A job whose
/// lease ran out (its worker died) is runnable again. Claiming counts an attempt, so a
/// job that kills its workers still runs out of attempts.
pub async fn claim(
    conn: &mut AsyncPgConnection,
    worker: &str,
    kinds: &[JobKind],
    limit: i64,
    lease: std::time::Duration,
) -> QueryResult<Vec<ClaimedJob>> {
    use diesel::sql_types::{Array, BigInt, Double};
    let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    diesel::sql_query(
        "UPDATE jobs SET locked_by = $1, \
                locked_until = now() + $2 * interval '1 second', \
                attempts = attempts + 1 \
         WHERE id IN ( \
             SELECT id FROM jobs \
             WHERE status = 'queued' AND kind = ANY($3) AND run_at <= now() \
               AND (locked_until IS NULL OR locked_until < now()) \
             ORDER BY run_at, id \
             LIMIT $4 \
             FOR UPDATE SKIP LOCKED) \
         RETURNING *",
    )
    .bind::<Text, _>(worker)
    .bind::<Double, _>(lease.as_secs_f64())
    .bind::<Array<Text>, _>(kinds)
    .bind::<BigInt, _>(limit)
    .load::<ClaimedJobRow>(conn)
    .await
    .map(|rows| rows.into_iter().map(|r| r.0).collect())
}

/// `sql_query` needs `QueryableByName`; the model is `Queryable`, so wrap it.
struct ClaimedJobRow(ClaimedJob);

impl diesel::QueryableByName<diesel::pg::Pg> for ClaimedJobRow {
    fn build<'a>(
        row: &impl diesel::row::NamedRow<'a, diesel::pg::Pg>,
    ) -> diesel::deserialize::Result<Self> {
        use diesel::row::NamedRow;
        use diesel::sql_types::{BigInt, Integer, Nullable, Timestamptz};
        Ok(Self(ClaimedJob {
            id: NamedRow::get::<BigInt, _>(row, "id")?,
            kind: NamedRow::get::<Text, JobKind>(row, "kind")?,
            instance_id: NamedRow::get::<diesel::sql_types::Uuid, _>(row, "instance_id")?,
            status: NamedRow::get::<Text, JobStatus>(row, "status")?,
            attempts: NamedRow::get::<Integer, _>(row, "attempts")?,
            run_at: NamedRow::get::<Timestamptz, _>(row, "run_at")?,
            locked_by: NamedRow::get::<Nullable<Text>, _>(row, "locked_by")?,
            locked_until: NamedRow::get::<Nullable<Timestamptz>, _>(row, "locked_until")?,
            last_error: NamedRow::get::<Nullable<Text>, _>(row, "last_error")?,
            created_at: NamedRow::get::<Timestamptz, _>(row, "created_at")?,
        }))
    }
}

/// Extends the lease on job `id` while `worker` still holds it; false if it lost it.
pub async fn renew(
    conn: &mut AsyncPgConnection,
    id: i64,
    worker: &str,
    lease: std::time::Duration,
) -> QueryResult<bool> {
    let renewed = diesel::update(held_by(id, worker))
        .set(jobs::locked_until.eq(db_now_plus(lease).nullable()))
        .execute(conn)
        .await?;
    Ok(renewed == 1)
}

/// The database's `now()` plus `after`: leases and schedules use the database's clock, so
/// workers on hosts with skewed clocks still agree.
fn db_now_plus(
    after: std::time::Duration,
) -> diesel::expression::SqlLiteral<diesel::sql_types::Timestamptz> {
    let micros = after.as_micros().min(i64::MAX as u128);
    diesel::dsl::sql(&format!("now() + interval '{micros} microseconds'"))
}

type Unlocked = (
    diesel::dsl::Eq<jobs::locked_by, Option<String>>,
    diesel::dsl::Eq<jobs::locked_until, Option<chrono::DateTime<chrono::Utc>>>,
);

/// The change that ends a lease.
fn unlocked() -> Unlocked {
    (jobs::locked_by.eq(None), jobs::locked_until.eq(None))
}

/// The jobs row `id` while `worker` holds its lease. Every change a worker makes to a job
/// it claimed goes through this filter, so a worker whose lease ran out (and whose job
/// another worker claimed since) cannot delete, re-queue or bury that job.
fn held_by(
    id: i64,
    worker: &str,
) -> diesel::dsl::Filter<
    diesel::dsl::Find<jobs::table, i64>,
    diesel::dsl::Eq<jobs::locked_by, String>,
> {
    jobs::table
        .find(id)
        .filter(jobs::locked_by.eq(worker.to_owned()))
}

/// Deletes a finished job, on the caller's connection (in the transaction that records
/// what the job achieved); false if `worker` no longer holds it.
pub async fn finish(conn: &mut AsyncPgConnection, id: i64, worker: &str) -> QueryResult<bool> {
    Ok(diesel::delete(held_by(id, worker)).execute(conn).await? == 1)
}

/// Puts a failed job back in the queue to run again after `delay`; false if `worker` no
/// longer holds it.
pub async fn retry_later(
    conn: &mut AsyncPgConnection,
    id: i64,
    worker: &str,
    delay: std::time::Duration,
    error: &str,
) -> QueryResult<bool> {
    let updated = diesel::update(held_by(id, worker))
        .set((
            jobs::run_at.eq(db_now_plus(delay)),
            unlocked(),
            jobs::last_error.eq(error),
        ))
        .execute(conn)
        .await?;
    Ok(updated == 1)
}

/// Hands a claimed job back without counting the attempt (a worker stopping, or a job
/// that must wait for another), to run again after `delay`.
pub async fn release(
    conn: &mut AsyncPgConnection,
    id: i64,
    worker: &str,
    delay: std::time::Duration,
) -> QueryResult<()> {
    diesel::update(held_by(id, worker))
        .set((
            jobs::run_at.eq(db_now_plus(delay)),
            unlocked(),
            jobs::attempts.eq(jobs::attempts - 1),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks a job `dead`: it stays for inspection and never runs again; false if `worker`
/// no longer holds it.
pub async fn bury(
    conn: &mut AsyncPgConnection,
    id: i64,
    worker: &str,
    error: &str,
) -> QueryResult<bool> {
    let updated = diesel::update(held_by(id, worker))
        .set((
            jobs::status.eq(JobStatus::Dead),
            unlocked(),
            jobs::last_error.eq(error),
        ))
        .execute(conn)
        .await?;
    Ok(updated == 1)
}

/// True while a `create` job for `instance_id` is leased by a live worker.
pub async fn create_in_flight(
    conn: &mut AsyncPgConnection,
    instance_id: Uuid,
) -> QueryResult<bool> {
    diesel::select(diesel::dsl::exists(
        jobs::table
            .filter(jobs::instance_id.eq(instance_id))
            .filter(jobs::kind.eq(JobKind::CreateInstance))
            .filter(jobs::status.eq(JobStatus::Queued))
            .filter(jobs::locked_until.gt(diesel::dsl::now)),
    ))
    .get_result(conn)
    .await
}
