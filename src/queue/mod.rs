//! The Postgres job queue, and everything about its mechanics: jobs are rows, enqueued in
//! the caller's transaction (so a request is never acknowledged without its job) and
//! announced on a NOTIFY channel at commit; workers claim them under a lease, renew it
//! while they run, and finish, retry, release or bury only what they still hold.
//! [`runner`] is the loop that does this for a [`runner::Handler`]; [`policy`] decides,
//! purely, what a failure leads to.

pub mod policy;
pub mod runner;

pub use policy::{JobError, Next};
pub use runner::{Handler, Outcome, Runner};

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::db::schema::jobs;
use crate::db::{CacheStatement, Pool, PooledConnection};
use crate::ids::{InstanceId, JobId};

/// A new row of `jobs`.
#[derive(Debug, Insertable)]
#[diesel(table_name = jobs)]
struct NewJob {
    /// What it does.
    kind: JobKind,
    /// The instance the job works on.
    instance_id: InstanceId,
}

/// The channel workers LISTEN on; Postgres delivers the NOTIFY only if the enqueue commits.
pub const JOBS_CHANNEL: &str = "cloudbrain_jobs";

crate::text_enum! {
    /// What a job does, stored by name in `jobs.kind`: never rename one.
    pub enum JobKind {
        /// Make the machine for an instance.
        CreateInstance => "create",
        /// Destroy the machine of an instance.
        RemoveInstance => "remove",
        /// Put the caller's key on the warm machine it took.
        AuthorizeKey => "authorize_key",
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

/// Adds a job for `instance_id` on the caller's connection (inside its transaction). It
/// sends no NOTIFY: once the transaction commits, its caller announces the job on
/// [`JOBS_CHANNEL`] (`Broker::announce`, through `db::Announcer`).
pub async fn enqueue(
    conn: &mut AsyncPgConnection,
    kind: JobKind,
    instance_id: InstanceId,
) -> QueryResult<()> {
    diesel::insert_into(jobs::table)
        .values(NewJob { kind, instance_id })
        .cached()
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes queued jobs of `kind` for `instance_id` that no worker holds a live lease on;
/// returns how many went.
pub async fn drop_unclaimed(
    conn: &mut AsyncPgConnection,
    kind: JobKind,
    instance_id: InstanceId,
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

/// A job a worker holds: claimed under a lease that lasts until the worker finishes,
/// retries, releases or buries it, or stops renewing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The job's row id.
    pub job_id: JobId,
    /// What it does.
    pub kind: JobKind,
    /// The instance it works on.
    pub instance_id: InstanceId,
    /// Which attempt this is, counting this one.
    pub attempts: i32,
    /// When it was enqueued.
    pub enqueued_at: DateTime<Utc>,
    /// The worker holding the lease, as `jobs.locked_by` names it.
    pub worker: String,
}

/// A common table expression that finishes a held job inside a larger statement (so the
/// job ends in the statement that writes what it achieved, with no transaction of its
/// own): `NAME AS (DELETE …)` deletes the job whose id is parameter `ID` if the worker
/// parameter `BY` names still holds it, and only if expression `GUARD` answered a row;
/// it returns the job's id when it did. [`finish`] is the same without the guard.
macro_rules! finish_held_cte {
    ($name:literal, $id:literal, $by:literal, $guard:literal) => {
        concat!(
            $name,
            " AS (DELETE FROM jobs WHERE id = ",
            $id,
            " AND locked_by = ",
            $by,
            " AND EXISTS (SELECT 1 FROM ",
            $guard,
            ") RETURNING id)"
        )
    };
}
pub(crate) use finish_held_cte;

/// Deletes a finished job on the caller's connection (in the transaction that records
/// what the job achieved); false if its worker no longer holds it.
pub async fn finish(conn: &mut AsyncPgConnection, lease: &Lease) -> QueryResult<bool> {
    Ok(diesel::delete(held(lease)).execute(conn).await? == 1)
}

/// Marks a job `dead` on the caller's connection (in the transaction that errors its
/// instance): it stays for inspection and never runs again; false if its worker no longer
/// holds it.
pub async fn bury(conn: &mut AsyncPgConnection, lease: &Lease, error: &str) -> QueryResult<bool> {
    let updated = diesel::update(held(lease))
        .set((
            jobs::status.eq(JobStatus::Dead),
            unlocked(),
            jobs::last_error.eq(error),
        ))
        .cached()
        .execute(conn)
        .await?;
    Ok(updated == 1)
}

/// True while a `create` job for `instance_id` is leased by a live worker.
pub async fn create_in_flight(
    conn: &mut AsyncPgConnection,
    instance_id: InstanceId,
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

/// The queue, over a connection pool: what workers do with jobs outside a caller's
/// transaction.
#[derive(Clone)]
pub struct Queue {
    pool: Pool,
}

impl Queue {
    /// The queue in the database behind `pool`.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    async fn conn(&self) -> anyhow::Result<PooledConnection> {
        self.pool.get().await.context("no database connection")
    }

    /// Claims up to `limit` runnable jobs of `kinds` for `worker`, leasing them for `lease`,
    /// of those that have been runnable for at least `waited` (zero: any).
    ///
    /// One statement, committed on return: the row locks taken by `FOR UPDATE SKIP LOCKED`
    /// last only while it runs, and from then on the lease (`locked_until`) marks
    /// ownership, so no transaction or connection is held while the job runs. A job whose
    /// lease ran out (its worker died) is runnable again. Claiming counts an attempt, so a
    /// job that kills its workers still runs out of attempts.
    #[tracing::instrument(level = "debug", skip(self, kinds), fields(claimed))]
    pub async fn claim(
        &self,
        worker: &str,
        kinds: &[JobKind],
        limit: usize,
        lease: Duration,
        waited: Duration,
    ) -> anyhow::Result<Vec<Lease>> {
        use diesel::sql_types::{Array, BigInt, Double};
        let mut conn = self.conn().await?;
        let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        // The oldest runnable jobs, locked by no one else (SKIP LOCKED), in one statement:
        // migrations/*_jobs_claim and *_claim_waited.
        let rows: Vec<ClaimedRow> =
            diesel::sql_query("SELECT * FROM claim_jobs($1, $2, $3, $4, $5)")
                .bind::<Text, _>(worker)
                .bind::<Double, _>(lease.as_secs_f64())
                .bind::<Array<Text>, _>(kinds)
                .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
                .bind::<Double, _>(waited.as_secs_f64())
                .cached()
                .load(&mut conn)
                .await?;
        tracing::Span::current().record("claimed", rows.len());
        Ok(rows
            .into_iter()
            .map(|row| Lease {
                job_id: row.id,
                kind: row.kind,
                instance_id: row.instance_id,
                attempts: row.attempts,
                enqueued_at: row.created_at,
                worker: worker.to_owned(),
            })
            .collect())
    }

    /// Extends a lease by `lease` from now; false if its worker lost it.
    pub async fn renew(&self, held: &Lease, lease: Duration) -> anyhow::Result<bool> {
        let mut conn = self.conn().await?;
        let renewed = diesel::update(self::held(held))
            .set(jobs::locked_until.eq(db_now_plus(lease).nullable()))
            .cached()
            .execute(&mut conn)
            .await?;
        Ok(renewed == 1)
    }

    /// True while a `create` job for `instance_id` is leased by a live worker.
    pub async fn create_in_flight(&self, instance_id: InstanceId) -> anyhow::Result<bool> {
        let mut conn = self.conn().await?;
        Ok(create_in_flight(&mut conn, instance_id).await?)
    }

    /// Deletes a job with nothing (more) to do; false if its worker no longer holds it.
    pub async fn finish(&self, lease: &Lease) -> anyhow::Result<bool> {
        let mut conn = self.conn().await?;
        Ok(finish(&mut conn, lease).await?)
    }

    /// Puts a failed job back to run again after `delay`; false if its worker no longer
    /// holds it.
    pub async fn retry_later(
        &self,
        lease: &Lease,
        delay: Duration,
        error: &str,
    ) -> anyhow::Result<bool> {
        let mut conn = self.conn().await?;
        let updated = diesel::update(held(lease))
            .set((
                jobs::run_at.eq(db_now_plus(delay)),
                unlocked(),
                jobs::last_error.eq(error),
            ))
            .cached()
            .execute(&mut conn)
            .await?;
        Ok(updated == 1)
    }

    /// Hands a job back without counting the attempt (its worker stopping, or a job that
    /// must wait for another), to run again after `delay`; false if its worker no longer
    /// holds it.
    pub async fn release(&self, lease: &Lease, delay: Duration) -> anyhow::Result<bool> {
        let mut conn = self.conn().await?;
        let updated = diesel::update(held(lease))
            .set((
                jobs::run_at.eq(db_now_plus(delay)),
                unlocked(),
                jobs::attempts.eq(jobs::attempts - 1),
            ))
            .cached()
            .execute(&mut conn)
            .await?;
        Ok(updated == 1)
    }
}

/// What a claim reads back of each job.
#[derive(diesel::QueryableByName)]
struct ClaimedRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: JobId,
    #[diesel(sql_type = Text)]
    kind: JobKind,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    instance_id: InstanceId,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    created_at: DateTime<Utc>,
}

/// The database's `now()` plus `after`: leases and schedules use the database's clock, so
/// workers on hosts with skewed clocks still agree.
fn db_now_plus(after: Duration) -> diesel::expression::SqlLiteral<diesel::sql_types::Timestamptz> {
    let micros = after.as_micros().min(i64::MAX as u128);
    diesel::dsl::sql(&format!("now() + interval '{micros} microseconds'"))
}

type Unlocked = (
    diesel::dsl::Eq<jobs::locked_by, Option<String>>,
    diesel::dsl::Eq<jobs::locked_until, Option<DateTime<Utc>>>,
);

/// The change that ends a lease.
fn unlocked() -> Unlocked {
    (jobs::locked_by.eq(None), jobs::locked_until.eq(None))
}

/// The job row of `lease` while its worker still holds it. Every change a worker makes to
/// a job it claimed goes through this filter, so a worker whose lease ran out (and whose
/// job another worker claimed since) cannot delete, re-queue, release or bury that job.
fn held(
    lease: &Lease,
) -> diesel::dsl::Filter<
    diesel::dsl::Find<jobs::table, JobId>,
    diesel::dsl::Eq<jobs::locked_by, String>,
> {
    jobs::table
        .find(lease.job_id)
        .filter(jobs::locked_by.eq(lease.worker.clone()))
}
