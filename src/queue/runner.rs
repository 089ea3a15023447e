//! The runner: claims jobs, runs each under a lease it renews, turns what a job returns
//! into done, retried, released or dead through [`super::policy`], and hands back what
//! it holds when it stops. It owns its LISTEN connection on [`super::JOBS_CHANNEL`].
//!
//! Of the runners of one set of kinds, one leads: it holds an advisory lock
//! ([`crate::db::locks::LEAD`]) and claims jobs as they are announced. The others help:
//! each poll interval they try to take the lead, then claim, as many as they have room
//! for, jobs that have waited a poll interval, which the leader has not got to (it is
//! full, or stopped). Two runners that both claimed every announced job ran slower than
//! one on a machine the database already kept busy (docs/benchmarks.md); a helper costs
//! a query a poll interval until it is needed.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::FutureExt;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::policy::{self, JobError, Next};
use super::{Claim, JobKind, Lease, Queue, JOBS_CHANNEL};
use crate::config::WorkerSettings;
use crate::db::listen::ListenWhile;
use crate::db::locks::Session;
use crate::metrics::Metrics;

/// The least time between two claims of one runner: a burst of jobs is claimed a few at a
/// time rather than one per query, and a lone job is claimed as soon as it is announced.
const CLAIM_SPACING: Duration = Duration::from_millis(2);

/// The least time after a claim that found nothing: with several workers woken by one
/// NOTIFY, those that lost the race claim less often, and the one that won claims as
/// soon as the next job is announced.
const EMPTY_CLAIM_SPACING: Duration = Duration::from_millis(10);

/// What runs the jobs a runner claims.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// What the jobs of one claim share: read once for all of them, before any runs.
    type Claimed: Send + Sync + 'static;
    /// Claims jobs as `claim` asks and reads what they will need, in as few round trips
    /// as it can (the claim itself is [`Claim::statement`]'s). What it could not read,
    /// each job reads itself; an error means nothing was claimed.
    async fn claim(&self, claim: &Claim<'_>) -> anyhow::Result<(Vec<Lease>, Self::Claimed)>;
    /// Does the job's work, with what was read for its claim. `Ok` once the job is
    /// finished (deleted, in the transaction that records what it achieved).
    async fn run(&self, lease: &Lease, claimed: &Self::Claimed) -> Result<(), JobError>;
    /// Gives up on the job: marks it dead and records `reason` where it belongs, in one
    /// transaction; false if its worker no longer holds it.
    async fn bury(&self, lease: &Lease, reason: &str) -> anyhow::Result<bool>;
}

/// How a job ended, for the loop and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It did what it was for (or found nothing left to do).
    Done,
    /// It failed and will run again later.
    Retried,
    /// It failed for good: the job is dead.
    Dead,
    /// It had to wait for something else and was handed back uncounted.
    Released,
    /// Its lease ran out and another worker claimed it: that one decides.
    Lost,
}

impl Outcome {
    /// The outcome's name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Retried => "retried",
            Outcome::Dead => "dead",
            Outcome::Released => "released",
            Outcome::Lost => "lost",
        }
    }
}

/// Claims jobs of some kinds and runs them with a [`Handler`].
pub struct Runner<H> {
    id: String,
    queue: Queue,
    handler: Arc<H>,
    kinds: Vec<JobKind>,
    metrics: Arc<Metrics>,
    settings: WorkerSettings,
    leads: AtomicBool,
}

impl<H: Handler> Runner<H> {
    /// A runner named `id` (as `jobs.locked_by` will show it) for jobs of `kinds`.
    pub fn new(
        id: String,
        queue: Queue,
        handler: Arc<H>,
        kinds: &[JobKind],
        metrics: Arc<Metrics>,
        settings: WorkerSettings,
    ) -> Self {
        Self {
            id,
            queue,
            handler,
            kinds: kinds.to_vec(),
            metrics,
            settings,
            leads: AtomicBool::new(false),
        }
    }

    /// Whether it leads the claims of its kinds (see the module's documentation).
    pub fn leads(&self) -> bool {
        self.leads.load(Ordering::Relaxed)
    }

    /// Takes the lead of its kinds (`key`) when no runner holds it, and learns whether it
    /// still does; when the database cannot tell, it goes on as it was. Whether it leads.
    async fn take_part(&self, lead: &Session, key: &str) -> bool {
        match lead.try_lead(key).await {
            Ok(leads) if leads != self.leads() => {
                self.leads.store(leads, Ordering::Relaxed);
                if leads {
                    tracing::info!(worker = %self.id, "job worker {} leads the claims", self.id);
                } else {
                    tracing::info!(worker = %self.id, "job worker {} helps: it claims jobs that waited {:?}", self.id, self.settings.poll_interval);
                }
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(worker = %self.id, error = %format!("{error:#}"), "could not ask for the claim lead")
            }
        }
        self.leads()
    }

    /// This runner's name, as it appears in `jobs.locked_by`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What runs its jobs.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Claims up to `limit` jobs that were runnable for `waited`, with what they need.
    #[tracing::instrument(level = "debug", skip(self), fields(worker = %self.id, claimed))]
    async fn claim(
        &self,
        limit: usize,
        waited: Duration,
    ) -> anyhow::Result<(Vec<Lease>, Arc<H::Claimed>)> {
        let claim = Claim {
            worker: &self.id,
            kinds: &self.kinds,
            limit,
            lease: self.settings.lease,
            waited,
        };
        let (leases, claimed) = self.handler.claim(&claim).await?;
        tracing::Span::current().record("claimed", leases.len());
        Ok((leases, Arc::new(claimed)))
    }

    /// Runs jobs until `shutdown` turns true: woken by NOTIFY on a connection of its own
    /// to `database_url`, polling as a fallback. On shutdown it stops claiming, lets
    /// running jobs finish within one lease, and hands back any that did not.
    pub async fn run(self: Arc<Self>, database_url: String, mut shutdown: watch::Receiver<bool>) {
        let wake = Arc::new(Notify::new());
        let lead = Session::new(database_url.clone());
        let kinds: Vec<&str> = self.kinds.iter().map(|k| k.as_str()).collect();
        let lead_key = kinds.join(",");
        // Only the leader listens (for each announced job; on connecting, it looks at once
        // for jobs enqueued unheard).
        let mut listening = ListenWhile::new(database_url, JOBS_CHANNEL, wake.clone());
        listening.set(self.take_part(&lead, &lead_key).await);
        let mut running: JoinSet<()> = JoinSet::new();
        let mut held: HashMap<tokio::task::Id, Lease> = HashMap::new();
        let poll = self.settings.poll_interval.max(Duration::from_millis(10));
        tracing::info!(worker = %self.id, concurrency = self.settings.concurrency, "job worker {} started", self.id);
        // When to claim: at start, on NOTIFY, each poll interval, and when a job ends while
        // the last claim took all it asked for (more may wait). A claim that got fewer
        // found the queue empty: a job ending then frees a slot but brings no work.
        let mut want = true;
        let mut more_waiting = false;
        let mut last_claim: Option<Instant> = None;
        // The last poll: a poll while every slot is busy claims nothing, and the next is
        // still a poll interval away.
        let mut last_poll: Option<Instant> = None;
        let mut came_empty = false;
        loop {
            while let Some(done) = running.try_join_next_with_id() {
                held.remove(&done.map(|(id, ())| id).unwrap_or_else(|e| e.id()));
            }
            if *shutdown.borrow() {
                break;
            }
            let free = self.settings.concurrency.saturating_sub(running.len());
            if want && free > 0 {
                // Claims are spaced: in a burst, one claim takes what came meanwhile; after
                // one that found nothing (another worker was quicker), a little longer.
                let spacing = if came_empty {
                    EMPTY_CLAIM_SPACING
                } else {
                    CLAIM_SPACING
                };
                if let Some(next) = last_claim.map(|at| at + spacing) {
                    tokio::select! {
                        _ = tokio::time::sleep_until(next.into()) => {}
                        _ = crate::shutdown::stopped(&mut shutdown) => continue,
                    }
                }
                let free = self.settings.concurrency.saturating_sub(running.len());
                want = false;
                last_claim = Some(Instant::now());
                let waited = if self.leads() {
                    Duration::ZERO
                } else {
                    self.settings.poll_interval
                };
                match self.claim(free, waited).await {
                    Ok((leases, claimed)) => {
                        more_waiting = leases.len() == free;
                        came_empty = leases.is_empty();
                        if !leases.is_empty() {
                            for lease in leases {
                                // Kept so the job can be handed back if shutdown cuts it off.
                                let kept = lease.clone();
                                let runner = self.clone();
                                let claimed = claimed.clone();
                                let task = async move {
                                    runner.run_job(lease, &claimed).await;
                                };
                                let handle = running.spawn(task.in_current_span());
                                held.insert(handle.id(), kept);
                            }
                        }
                    }
                    Err(error) => {
                        more_waiting = false;
                        tracing::warn!(error = %format!("{error:#}"), "claiming jobs failed")
                    }
                }
            }
            let polled = last_claim
                .max(last_poll)
                .map_or_else(Instant::now, |at| at + poll);
            tokio::select! {
                _ = wake.notified() => want = true,
                _ = tokio::time::sleep_until(polled.into()) => {
                    last_poll = Some(Instant::now());
                    listening.set(self.take_part(&lead, &lead_key).await);
                    want = true;
                }
                Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                    held.remove(&done.map(|(id, ())| id).unwrap_or_else(|e| e.id()));
                    // A helper claims at its polls only.
                    want |= more_waiting && self.leads();
                }
                _ = crate::shutdown::stopped(&mut shutdown) => {}
            }
        }
        listening.set(false);
        tracing::info!(worker = %self.id, running = running.len(), "job worker stopping");
        let drained = tokio::time::timeout(self.settings.lease, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            running.abort_all();
            while running.join_next().await.is_some() {}
            for lease in held.values() {
                if let Err(error) = self.queue.release(lease, Duration::ZERO).await {
                    tracing::warn!(job.id = %lease.job_id, error = %format!("{error:#}"), "could not hand back job {}", lease.job_id);
                }
            }
        }
        tracing::info!(worker = %self.id, "job worker stopped");
    }

    /// Claims and runs jobs until none is runnable; returns how many ran. For tests and
    /// one-shot use.
    pub async fn run_until_idle(self: &Arc<Self>) -> anyhow::Result<usize> {
        let mut ran = 0;
        loop {
            let (leases, claimed) = self
                .claim(self.settings.concurrency, Duration::ZERO)
                .await?;
            if leases.is_empty() {
                return Ok(ran);
            }
            ran += leases.len();
            let mut running = JoinSet::new();
            for lease in leases {
                let runner = self.clone();
                let claimed = claimed.clone();
                running.spawn(async move { runner.run_job(lease, &claimed).await });
            }
            while running.join_next().await.is_some() {}
        }
    }

    /// Runs one claimed job to an outcome, with what was read for its claim, renewing its
    /// lease while it runs; a panic counts as a failure.
    pub async fn run_job(&self, lease: Lease, claimed: &H::Claimed) -> Outcome {
        let span = tracing::info_span!(
            "job",
            job.id = %lease.job_id,
            job.kind = lease.kind.as_str(),
            instance.id = %lease.instance_id,
            attempt = lease.attempts
        );
        async {
            let work = AssertUnwindSafe(self.handler.run(&lease, claimed)).catch_unwind();
            let result = tokio::select! {
                result = work => result,
                never = self.renew_while_running(&lease) => match never {},
            };
            let outcome = match result {
                Ok(Ok(())) => Outcome::Done,
                Ok(Err(error)) => self.settle(&lease, error).await,
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".to_owned());
                    self.settle(&lease, JobError::Panicked(message)).await
                }
            };
            self.metrics
                .count_job(lease.kind.as_str(), outcome.as_str());
            tracing::info!(
                outcome = outcome.as_str(),
                "job {} {}",
                lease.job_id,
                outcome.as_str()
            );
            outcome
        }
        .instrument(span)
        .await
    }

    /// Renews the lease every third of its length; never returns.
    async fn renew_while_running(&self, lease: &Lease) -> std::convert::Infallible {
        let every = self.settings.lease / 3;
        let id = lease.job_id;
        loop {
            tokio::time::sleep(every).await;
            match self.queue.renew(lease, self.settings.lease).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    job.id = %id,
                    "lost the lease on job {id}; another worker may run it too"
                ),
                Err(error) => {
                    tracing::warn!(job.id = %id, error = %format!("{error:#}"), "could not renew the lease on job {id}")
                }
            }
        }
    }

    /// Does what the policy says to a job that ended in `error`.
    async fn settle(&self, lease: &Lease, error: JobError) -> Outcome {
        let id = lease.job_id;
        let held = |result: anyhow::Result<bool>, outcome: Outcome, doing: &str| match result {
            Ok(true) => outcome,
            Ok(false) => Outcome::Lost,
            Err(error) => {
                // The lease will run out and another attempt follow: nothing is lost.
                tracing::error!(job.id = %id, error = %format!("{error:#}"), "could not {doing} job {id}");
                Outcome::Retried
            }
        };
        match policy::next(&error, lease.attempts, &self.settings) {
            Next::Leave => Outcome::Lost,
            Next::Release(delay) => {
                let released = self.queue.release(lease, delay).await;
                held(released, Outcome::Released, "hand back")
            }
            Next::Retry { at_least, spread } => {
                let delay = at_least + spread.mul_f64(rand::random::<f64>());
                tracing::warn!(
                    job.id = %id,
                    delay_ms = delay.as_millis() as u64,
                    error = %error,
                    "job {id} failed; retrying"
                );
                let retried = self
                    .queue
                    .retry_later(lease, delay, &error.to_string())
                    .await;
                held(retried, Outcome::Retried, "reschedule")
            }
            Next::Bury(reason) => {
                let buried = self.handler.bury(lease, &reason).await;
                held(buried, Outcome::Dead, "record the failure of")
            }
        }
    }
}
