//! The rules the workers follow: what a job's result does to its instance, and how the
//! refresh moves rows in step with what the cloud says. Every change of state goes through
//! the guarded [`transition`], so nothing here can move an instance backwards.

use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudbrain_provider::{CloudInstance, CloudState};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use uuid::Uuid;

use super::state::{transition, State};
use super::{Broker, BrokerError};
use crate::db::models::{Instance, InstanceChange, Job};
use crate::db::schema::instances;
use crate::jobs;

/// What the refresh should do to a machine after reconciling its row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing.
    Keep,
    /// Destroy the machine: its instance errored, or it belongs to no live instance.
    Destroy,
}

impl Broker {
    /// Reads the instance a job works on.
    pub async fn job_instance(&self, id: Uuid) -> Result<Option<Instance>, BrokerError> {
        let mut conn = self.conn().await?;
        Ok(instances::table
            .find(id)
            .select(Instance::as_select())
            .first(&mut conn)
            .await
            .optional()?)
    }

    /// Finishes a job that has nothing (more) to do; false if its worker lost the lease.
    pub async fn finish_job(&self, job: &Job) -> Result<bool, BrokerError> {
        let mut conn = self.conn().await?;
        Ok(jobs::finish(&mut conn, job.id, owner(job)).await?)
    }

    /// Records the machine a create job made and finishes the job, in one transaction.
    ///
    /// If the instance moved on meanwhile (deleted, timed out) the row stays as it is; the
    /// machine is then the remove job's or the refresh's to destroy. What the cloud said is
    /// recorded even when the worker lost its lease: the guarded transition makes it safe,
    /// and the job stays with the worker that holds it now.
    pub async fn record_launched(
        &self,
        job: &Job,
        machine: &CloudInstance,
    ) -> Result<Option<Instance>, BrokerError> {
        let mut conn = self.conn().await?;
        conn.transaction::<_, BrokerError, _>(async |conn| {
            let updated = apply_cloud_state(conn, job.instance_id, machine).await?;
            finish_held(conn, job).await?;
            Ok(updated)
        })
        .await
    }

    /// Records that an instance's machine is gone and finishes its remove job.
    pub async fn record_terminated(&self, job: &Job) -> Result<(), BrokerError> {
        let id = job.instance_id;
        let mut conn = self.conn().await?;
        conn.transaction::<_, BrokerError, _>(async |conn| {
            transition(conn, id, State::Terminated, None, InstanceChange::default()).await?;
            finish_held(conn, job).await
        })
        .await?;
        tracing::info!(instance.id = %id, "instance {id} terminated");
        Ok(())
    }

    /// Gives up on a job: its instance is `errored` with `reason`, and the job stays `dead`.
    /// False, and nothing changed, if its worker lost the lease: the worker holding the job
    /// now decides.
    pub async fn bury_job(&self, job: &Job, reason: &str) -> Result<bool, BrokerError> {
        let mut conn = self.conn().await?;
        let buried = conn
            .transaction::<_, BrokerError, _>(async |conn| {
                if !jobs::bury(conn, job.id, owner(job), reason).await? {
                    return Ok(false);
                }
                let change = InstanceChange {
                    error_reason: Some(reason),
                    ..InstanceChange::default()
                };
                transition(conn, job.instance_id, State::Errored, Some(reason), change).await?;
                Ok(true)
            })
            .await?;
        if buried {
            tracing::warn!(instance.id = %job.instance_id, job.id = job.id, reason, "instance {} errored", job.instance_id);
        }
        Ok(buried)
    }

    /// Schedules a failed job to run again after `delay`; false if its worker lost the lease.
    pub async fn retry_job(
        &self,
        job: &Job,
        delay: Duration,
        error: &str,
    ) -> Result<bool, BrokerError> {
        let mut conn = self.conn().await?;
        Ok(jobs::retry_later(&mut conn, job.id, owner(job), delay, error).await?)
    }

    /// Hands a job back without counting the attempt.
    pub async fn release_job(
        &self,
        job: &Job,
        worker: &str,
        delay: Duration,
    ) -> Result<(), BrokerError> {
        let mut conn = self.conn().await?;
        jobs::release(&mut conn, job.id, worker, delay).await?;
        Ok(())
    }

    /// True while a create job for the instance is being worked on.
    pub async fn create_in_flight(&self, id: Uuid) -> Result<bool, BrokerError> {
        let mut conn = self.conn().await?;
        Ok(jobs::create_in_flight(&mut conn, id).await?)
    }

    /// Extends a job's lease; false if the worker lost it.
    pub async fn renew_lease(
        &self,
        job_id: i64,
        worker: &str,
        lease: Duration,
    ) -> Result<bool, BrokerError> {
        let mut conn = self.conn().await?;
        Ok(jobs::renew(&mut conn, job_id, worker, lease).await?)
    }

    /// Instances on `provider` that are not terminated.
    pub async fn live_instances(&self, provider: &str) -> Result<Vec<Instance>, BrokerError> {
        let mut conn = self.conn().await?;
        Ok(instances::table
            .filter(instances::provider_name.eq(provider))
            .filter(instances::state.ne(State::Terminated))
            .select(Instance::as_select())
            .load(&mut conn)
            .await?)
    }

    /// The database's clock, which stamps every row's `updated_at`.
    pub async fn db_now(&self) -> Result<DateTime<Utc>, BrokerError> {
        let mut conn = self.conn().await?;
        Ok(
            diesel::select(diesel::dsl::now.into_sql::<diesel::sql_types::Timestamptz>())
                .get_result::<DateTime<Utc>>(&mut conn)
                .await?,
        )
    }

    /// Brings one live instance in step with its machine as a listing of the cloud begun
    /// at `listed_at` (database clock) shows it (`None`: the listing had none), and says
    /// whether the machine should be destroyed. Writes nothing when nothing changed.
    ///
    /// A row that changed after the listing began is newer than the listing: a machine
    /// recorded meanwhile may be missing from it, so its absence proves nothing, and the
    /// row waits for the next refresh.
    pub async fn reconcile(
        &self,
        instance: &Instance,
        machine: Option<&CloudInstance>,
        listed_at: DateTime<Utc>,
        launch_timeout: Duration,
    ) -> Result<Verdict, BrokerError> {
        if machine.is_none() && instance.updated_at >= listed_at {
            return Ok(Verdict::Keep);
        }
        let state = instance.state;
        let launching = matches!(state, State::Creating | State::Starting);
        let mut conn = self.conn().await?;
        let fail = async |conn: &mut diesel_async::AsyncPgConnection, reason: &str| {
            conn.transaction::<_, BrokerError, _>(async |conn| {
                let change = InstanceChange {
                    error_reason: Some(reason),
                    ..InstanceChange::default()
                };
                transition(conn, instance.id, State::Errored, Some(reason), change).await?;
                // Its create job, if nobody holds it, has nothing left to do.
                jobs::drop_unclaimed(conn, jobs::JobKind::CreateInstance, instance.id).await?;
                Ok(())
            })
            .await?;
            tracing::warn!(instance.id = %instance.id, reason, "instance {} errored", instance.id);
            Ok::<_, BrokerError>(Verdict::Destroy)
        };

        match (state, machine.map(|m| &m.state)) {
            (State::Terminating | State::Terminated, _) => return Ok(Verdict::Keep),
            (State::Errored, Some(_)) => return Ok(Verdict::Destroy),
            (State::Errored, None) => return Ok(Verdict::Keep),
            (_, Some(CloudState::Failed(reason))) => return fail(&mut conn, reason).await,
            (_, Some(CloudState::Terminating | CloudState::Terminated)) => {
                return fail(&mut conn, "the machine was stopped outside cloudbrain").await;
            }
            (State::Starting | State::Running, None) => {
                return fail(&mut conn, "the machine vanished from the cloud").await;
            }
            (_, Some(CloudState::Starting | CloudState::Running)) => {
                if let Some(machine) = machine {
                    if needs_update(instance, machine) {
                        apply_cloud_state(&mut conn, instance.id, machine).await?;
                    }
                    if matches!(machine.state, CloudState::Running) {
                        return Ok(Verdict::Keep);
                    }
                }
            }
            (State::Creating, None) => {}
        }
        let age = Utc::now().signed_duration_since(instance.created_at);
        if launching && age.to_std().is_ok_and(|age| age > launch_timeout) {
            let reason = format!(
                "the machine was not running {} s after it was asked for",
                launch_timeout.as_secs()
            );
            return fail(&mut conn, &reason).await;
        }
        Ok(Verdict::Keep)
    }
}

/// The worker that claimed `job`; an unclaimed job has none, and matches no worker.
fn owner(job: &Job) -> &str {
    job.locked_by.as_deref().unwrap_or_default()
}

/// Deletes a job its worker finished, unless the worker lost the lease meanwhile.
async fn finish_held(
    conn: &mut diesel_async::AsyncPgConnection,
    job: &Job,
) -> Result<(), BrokerError> {
    if !jobs::finish(conn, job.id, owner(job)).await? {
        tracing::warn!(
            job.id = job.id,
            "job {} was claimed by another worker; leaving it to that one",
            job.id
        );
    }
    Ok(())
}

/// True when the machine says something the row does not yet.
fn needs_update(instance: &Instance, machine: &CloudInstance) -> bool {
    let state_ahead = matches!(
        (instance.state, &machine.state),
        (State::Creating, CloudState::Starting | CloudState::Running)
            | (State::Starting, CloudState::Running)
    );
    state_ahead
        || instance.upstream_id.as_deref() != Some(machine.upstream_id.as_str())
        || (machine.ip_address.is_some() && instance.ip_address != machine.ip_address)
        || (machine.ecs.is_some() && instance.ecs != ecs_json(machine))
}

fn ecs_json(machine: &CloudInstance) -> Option<serde_json::Value> {
    machine
        .ecs
        .as_ref()
        .and_then(|m| serde_json::to_value(m).ok())
}

/// Moves an instance forward to what its machine says, with its id and address.
async fn apply_cloud_state(
    conn: &mut diesel_async::AsyncPgConnection,
    id: Uuid,
    machine: &CloudInstance,
) -> Result<Option<Instance>, BrokerError> {
    let ecs = ecs_json(machine);
    let change = || InstanceChange {
        upstream_id: Some(&machine.upstream_id),
        ip_address: machine.ip_address.as_deref(),
        error_reason: None,
        ecs: ecs.as_ref(),
    };
    let to = match &machine.state {
        CloudState::Starting => State::Starting,
        CloudState::Running => State::Running,
        CloudState::Failed(reason) => {
            let change = InstanceChange {
                error_reason: Some(reason),
                ..change()
            };
            return Ok(transition(conn, id, State::Errored, Some(reason), change).await?);
        }
        CloudState::Terminating | CloudState::Terminated => {
            let reason = "the machine stopped as soon as it was made";
            let change = InstanceChange {
                error_reason: Some(reason),
                ..change()
            };
            return Ok(transition(conn, id, State::Errored, Some(reason), change).await?);
        }
    };
    if let Some(updated) = transition(conn, id, to, None, change()).await? {
        tracing::info!(instance.id = %id, state = to.as_str(), "instance {id} {}", to.as_str());
        return Ok(Some(updated));
    }
    // Same state (or the row moved on): only fill in what the cloud newly says, and only on
    // a row still launching or running.
    let updated = diesel::update(
        instances::table
            .filter(instances::id.eq(id))
            .filter(instances::state.eq_any([State::Starting, State::Running])),
    )
    .set((instances::updated_at.eq(diesel::dsl::now), change()))
    .returning(Instance::as_returning())
    .get_result(conn)
    .await
    .optional()?;
    Ok(updated)
}

#[derive(diesel::QueryableByName)]
struct GaugeRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    a: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    b: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

impl Broker {
    /// Counts for `/metrics`: instances by provider and state, jobs queued and dead by kind.
    pub async fn gauges(&self) -> Result<crate::metrics::Gauges, BrokerError> {
        let mut conn = self.conn().await?;
        let instances: Vec<GaugeRow> = diesel::sql_query(
            "SELECT provider_name AS a, state AS b, count(*) AS n FROM instances \
             GROUP BY provider_name, state ORDER BY 1, 2",
        )
        .load(&mut conn)
        .await?;
        let jobs: Vec<GaugeRow> = diesel::sql_query(
            "SELECT kind AS a, status AS b, count(*) AS n FROM jobs GROUP BY kind, status ORDER BY 1, 2",
        )
        .load(&mut conn)
        .await?;
        let by_status = |status: &str| {
            jobs.iter()
                .filter(|r| r.b == status)
                .map(|r| (r.a.clone(), r.n))
                .collect()
        };
        Ok(crate::metrics::Gauges {
            queued_jobs: by_status("queued"),
            dead_jobs: by_status("dead"),
            instances: instances.into_iter().map(|r| (r.a, r.b, r.n)).collect(),
        })
    }
}
