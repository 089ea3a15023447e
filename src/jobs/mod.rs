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

/// What a job does. The strings are stored in the database: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Make the machine for an instance.
    CreateInstance,
    /// Destroy the machine of an instance.
    RemoveInstance,
}

impl JobKind {
    /// The value stored in `jobs.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::CreateInstance => "create",
            JobKind::RemoveInstance => "remove",
        }
    }
}

/// Adds a job for `instance_id` on the caller's connection (inside its transaction).
pub async fn enqueue(
    conn: &mut AsyncPgConnection,
    kind: JobKind,
    instance_id: Uuid,
) -> QueryResult<()> {
    diesel::insert_into(jobs::table)
        .values(NewJob {
            kind: kind.as_str(),
            instance_id,
        })
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
            .filter(jobs::kind.eq(kind.as_str()))
            .filter(jobs::status.eq("queued"))
            .filter(
                jobs::locked_until
                    .is_null()
                    .or(jobs::locked_until.lt(diesel::dsl::now)),
            ),
    )
    .execute(conn)
    .await
}
