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

/// The claim's statement: `SELECT` the claimed jobs, as [`ClaimedJob`] reads them, `FROM`
/// the SQL function `claim_jobs` (migrations `*_jobs_claim`, `*_claim_waited`), with the
/// parameters [`Claim::statement`] binds. A caller that reads more with the claim wraps it
/// (`… FROM (claimed_jobs_sql!()) AS c JOIN …`): its columns are named `job_*` so that they
/// never clash with a joined table's.
macro_rules! claimed_jobs_sql {
    () => {
        "SELECT id AS job_id, kind AS job_kind, instance_id AS job_instance_id, \
         attempts AS job_attempts, created_at AS job_created_at \
         FROM claim_jobs($1, $2, $3, $4, $5)"
    };
}
pub(crate) use claimed_jobs_sql;

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
    pub async fn claim(
        &self,
        worker: &str,
        kinds: &[JobKind],
        limit: usize,
        lease: Duration,
        waited: Duration,
    ) -> anyhow::Result<Vec<Lease>> {
        let claim = Claim {
            worker,
            kinds,
            limit,
            lease,
            waited,
        };
        let mut conn = self.conn().await?;
        let rows: Vec<ClaimedJob> = claim
            .statement(claimed_jobs_sql!())
            .cached()
            .load(&mut conn)
            .await?;
        Ok(rows.into_iter().map(|row| row.lease(worker)).collect())
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

/// What a claim asks for: up to `limit` runnable jobs of `kinds`, runnable for at least
/// `waited`, leased to `worker` for `lease`. See [`Queue::claim`].
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// The worker, as `jobs.locked_by` will name it.
    pub worker: &'a str,
    /// The kinds of job it runs.
    pub kinds: &'a [JobKind],
    /// How many jobs at most.
    pub limit: usize,
    /// How long the lease lasts before it must be renewed.
    pub lease: Duration,
    /// How long a job must have been runnable (zero: any).
    pub waited: Duration,
}

impl<'a> Claim<'a> {
    /// `sql`, a statement around [`claimed_jobs_sql!`], with the claim's parameters bound.
    pub(crate) fn statement(
        &self,
        sql: &'static str,
    ) -> diesel::query_builder::BoxedSqlQuery<'a, diesel::pg::Pg, diesel::query_builder::SqlQuery>
    {
        use diesel::sql_types::{Array, BigInt, Double};
        let kinds: Vec<&'static str> = self.kinds.iter().map(|k| k.as_str()).collect();
        diesel::sql_query(sql)
            .into_boxed()
            .bind::<Text, _>(self.worker)
            .bind::<Double, _>(self.lease.as_secs_f64())
            .bind::<Array<Text>, _>(kinds)
            .bind::<BigInt, _>(i64::try_from(self.limit).unwrap_or(i64::MAX))
            .bind::<Double, _>(self.waited.as_secs_f64())
    }
}

/// What a claim reads back of each job (the columns of [`claimed_jobs_sql!`]).
#[derive(Debug, diesel::QueryableByName)]
pub struct ClaimedJob {
    #[diesel(sql_type = diesel::sql_types::BigInt, column_name = job_id)]
    id: JobId,
    #[diesel(sql_type = Text, column_name = job_kind)]
    kind: JobKind,
    #[diesel(sql_type = diesel::sql_types::Uuid, column_name = job_instance_id)]
    instance_id: InstanceId,
    #[diesel(sql_type = diesel::sql_types::Integer, column_name = job_attempts)]
    attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Timestamptz, column_name = job_created_at)]
    created_at: DateTime<Utc>,
}

impl ClaimedJob {
    /// The lease `worker` now holds on the job.
    pub fn lease(self, worker: &str) -> Lease {
        Lease {
            job_id: self.id,
            kind: self.kind,
            instance_id: self.instance_id,
            attempts: self.attempts,
            enqueued_at: self.created_at,
            worker: worker.to_owned(),
        }
    }
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
