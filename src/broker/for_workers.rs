//! What the workers ask of the broker: the rows they work on, and writing the decisions
//! of [`super::lifecycle`] (with the job that made them, in one transaction).

use std::collections::HashMap;

use crate::ids::InstanceId;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::lifecycle::Decision;
use super::model::Instance;
use super::offerings::Placing;
use super::state::{apply, apply_finishing, enqueues, note_all, State};
use super::{Broker, BrokerError};
use crate::db::schema::instances;
use crate::db::CacheStatement;
use crate::queue::{self, Lease};

/// How many decisions [`Broker::apply_all`] writes in one transaction: one commit (one
/// flush of the log) for many rows, and row locks held for a few milliseconds.
const APPLY_BATCH: usize = 256;

/// A claimed job and its instance, as [`Broker::claim`] reads them.
#[derive(diesel::QueryableByName)]
struct ClaimedWithInstance {
    #[diesel(embed)]
    job: queue::ClaimedJob,
    #[diesel(embed)]
    instance: Instance,
}

/// What the jobs of one claim read once, together, before any of them runs: their
/// instances and what placing a machine goes by. Each job still reads again what it
/// reads after its first step (a row changed under it is caught by the guarded write).
#[derive(Debug, Default)]
pub struct ClaimedRows {
    instances: HashMap<InstanceId, Instance>,
    placing: Option<Placing>,
}

impl ClaimedRows {
    /// The instance `id` as the claim read it; `None` when it was not read with it.
    pub fn instance(&self, id: InstanceId) -> Option<&Instance> {
        self.instances.get(&id)
    }

    /// What placing goes by, as the claim read it.
    pub fn placing(&self) -> Option<&Placing> {
        self.placing.as_ref()
    }
}

impl Broker {
    /// Claims jobs as `claim` asks, reading with them their instances and, when
    /// `placing`, what placing goes by: one statement for the claim and its instances
    /// (each instance read after the claim took its job, migration `claimed_instance`),
    /// and the two reads of placing sent with it (pipelined on the connection), so a whole
    /// claim costs one wait. The claim stands once its statement has answered: a failed
    /// read of placing only leaves each create job to read it itself.
    pub async fn claim(
        &self,
        claim: &queue::Claim<'_>,
        placing: bool,
    ) -> Result<(Vec<Lease>, ClaimedRows), BrokerError> {
        let conn = self.conn().await?;
        let shared: &AsyncPgConnection = &conn;
        let mut on = shared;
        let claimed = claim
            .statement(concat!(
                "SELECT c.*, i.* FROM (",
                queue::claimed_jobs_sql!(),
                ") AS c JOIN LATERAL claimed_instance(c.job_instance_id) AS i ON true"
            ))
            .cached()
            .load::<ClaimedWithInstance>(&mut on);
        let (claimed, placing) = futures_util::join!(claimed, async {
            match placing {
                true => Some(Placing::read(shared).await),
                false => None,
            }
        });
        let placing = placing.and_then(|read| {
            read.map_err(|error| tracing::warn!(%error, "could not read what placing goes by with a claim; each create job reads it"))
                .ok()
        });
        let mut instances = HashMap::new();
        let leases = claimed?
            .into_iter()
            .map(|row| {
                instances.insert(row.instance.id, row.instance);
                row.job.lease(claim.worker)
            })
            .collect();
        Ok((leases, ClaimedRows { instances, placing }))
    }

    /// Reads the instance a job works on.
    pub async fn job_instance(&self, id: InstanceId) -> Result<Option<Instance>, BrokerError> {
        let mut conn = self.conn().await?;
        Ok(instances::table
            .find(id)
            .select(Instance::as_select())
            .first(&mut conn)
            .await
            .optional()?)
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

    /// Writes each instance's decision, many to a transaction, and returns how many rows
    /// changed. Rows are locked in id order, so two writers never wait on each other in a
    /// cycle; decisions that write nothing cost nothing.
    pub async fn apply_all(
        &self,
        decisions: &[(InstanceId, Decision)],
    ) -> Result<usize, BrokerError> {
        let mut writes: Vec<_> = decisions.iter().filter(|(_, d)| d.writes()).collect();
        writes.sort_by_key(|(id, _)| id.0);
        let mut written = 0;
        for batch in writes.chunks(APPLY_BATCH) {
            let mut conn = self.conn().await?;
            written += conn
                .transaction::<_, BrokerError, _>(async |conn| {
                    // What the cloud newly says of machines whose state stays, in one
                    // statement; every other decision through the guarded transition.
                    let notes: Vec<_> = batch
                        .iter()
                        .filter_map(|(id, d)| match d {
                            Decision::Note(seen) => Some((*id, seen)),
                            _ => None,
                        })
                        .collect();
                    let mut n = note_all(conn, &notes).await?;
                    for (id, decision) in batch {
                        if !matches!(decision, Decision::Note(_)) {
                            n += usize::from(apply(conn, *id, decision).await?.is_some());
                        }
                    }
                    Ok(n)
                })
                .await?;
        }
        if written > 0 {
            self.announce(writes.iter().any(|(_, d)| enqueues(d)));
        }
        Ok(written)
    }

    /// Writes what job `lease` decided for its instance and finishes the job, in one
    /// transaction.
    ///
    /// If the instance moved on meanwhile (deleted, timed out) the guarded transition
    /// leaves it as it is. What the cloud said is recorded even when the worker lost its
    /// lease: the guarded transition makes it safe, and the job stays with the worker that
    /// holds it now.
    pub async fn finish_with(&self, lease: &Lease, decision: &Decision) -> Result<(), BrokerError> {
        let mut conn = self.conn().await?;
        // Most decisions are a move the row allows: one statement writes it and ends the
        // job. The others, and a move the row no longer allows, take a transaction.
        let finished = match apply_finishing(&mut conn, lease, decision).await? {
            Some(finished) => finished,
            None => {
                conn.transaction::<_, BrokerError, _>(async |conn| {
                    apply(conn, lease.instance_id, decision).await?;
                    Ok(queue::finish(conn, lease).await?)
                })
                .await?
            }
        };
        self.announce(enqueues(decision));
        if !finished {
            tracing::warn!(
                job.id = %lease.job_id,
                "job {} was claimed by another worker; leaving it to that one",
                lease.job_id
            );
        }
        Ok(())
    }

    /// Gives up on job `lease`: its instance is `errored` with `reason`, and the job stays
    /// `dead`. False, and nothing changed, if its worker lost the lease: the worker holding
    /// the job now decides.
    pub async fn bury(&self, lease: &Lease, reason: &str) -> Result<bool, BrokerError> {
        let mut conn = self.conn().await?;
        let buried = conn
            .transaction::<_, BrokerError, _>(async |conn| {
                if !queue::bury(conn, lease, reason).await? {
                    return Ok(false);
                }
                let failed = Decision::Fail {
                    reason: reason.to_owned(),
                    seen: None,
                };
                apply(conn, lease.instance_id, &failed).await?;
                Ok(true)
            })
            .await?;
        if buried {
            self.announce(false);
        }
        Ok(buried)
    }
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
