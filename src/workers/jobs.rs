//! The job worker: claims `create` and `remove` jobs, calls the provider with no
//! transaction or pooled connection held, and records the outcome through the broker.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cloudbrain_provider::{CloudState, InstanceSpec, Provider, ProviderError};
use futures_util::FutureExt;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::{jittered, provider, stopped};
use crate::broker::{Broker, BrokerError, State};
use crate::config::WorkerSettings;
use crate::db::models::Job;
use crate::jobs::{self, JobKind};
use crate::metrics::Metrics;
use crate::providers::Registry;

/// How a job ended, for the loop and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It did what it was for (or found nothing left to do).
    Done,
    /// It failed and will run again later.
    Retried,
    /// It failed for good: its instance is errored and the job is dead.
    Dead,
    /// It had to wait for something else and was handed back uncounted.
    Released,
    /// Its lease ran out and another worker claimed it: that one decides.
    Lost,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Retried => "retried",
            Outcome::Dead => "dead",
            Outcome::Released => "released",
            Outcome::Lost => "lost",
        }
    }
}

/// Runs create and remove jobs.
pub struct JobWorker {
    id: String,
    broker: Broker,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    settings: WorkerSettings,
}

impl JobWorker {
    /// A worker named `id` running jobs with `settings`.
    pub fn new(
        id: String,
        broker: Broker,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        settings: WorkerSettings,
    ) -> Self {
        Self {
            id,
            broker,
            registry,
            metrics,
            settings,
        }
    }

    /// This worker's name, as it appears in `jobs.locked_by`.
    pub fn id(&self) -> &str {
        &self.id
    }

    async fn claim(&self, limit: usize) -> Result<Vec<Job>, BrokerError> {
        let mut conn = self
            .broker
            .pool()
            .get()
            .await
            .map_err(|_| BrokerError::Unavailable)?;
        Ok(jobs::claim(
            &mut conn,
            &self.id,
            &[JobKind::CreateInstance, JobKind::RemoveInstance],
            limit as i64,
            self.settings.lease,
        )
        .await?)
    }

    /// Runs jobs until `shutdown` turns true; woken by `wake` (LISTEN/NOTIFY), polling as a
    /// fallback. On shutdown it stops claiming, lets running jobs finish within one lease,
    /// and hands back any that did not.
    pub async fn run(self: Arc<Self>, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
        let mut running: JoinSet<()> = JoinSet::new();
        let mut held: HashMap<tokio::task::Id, Job> = HashMap::new();
        let poll = self.settings.poll_interval.max(Duration::from_millis(10));
        tracing::info!(worker = %self.id, concurrency = self.settings.concurrency, "job worker {} started", self.id);
        loop {
            while let Some(done) = running.try_join_next_with_id() {
                let id = done.map(|(id, ())| id).unwrap_or_else(|e| e.id());
                held.remove(&id);
            }
            if *shutdown.borrow() {
                break;
            }
            let free = self.settings.concurrency.saturating_sub(running.len());
            let mut claimed = 0;
            if free > 0 {
                match self.claim(free).await {
                    Ok(jobs) => {
                        claimed = jobs.len();
                        for job in jobs {
                            // Kept so the job can be handed back if shutdown cuts it off.
                            let kept = job.clone();
                            let worker = self.clone();
                            let handle = running.spawn(
                                async move {
                                    worker.run_job(job).await;
                                }
                                .in_current_span(),
                            );
                            held.insert(handle.id(), kept);
                        }
                    }
                    Err(error) => tracing::warn!(%error, "claiming jobs failed"),
                }
            }
            if claimed > 0 && claimed == free {
                continue;
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                    let id = done.map(|(id, ())| id).unwrap_or_else(|e| e.id());
                    held.remove(&id);
                }
                _ = stopped(&mut shutdown) => {}
            }
        }
        tracing::info!(worker = %self.id, running = running.len(), "job worker stopping");
        let drained = tokio::time::timeout(self.settings.lease, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            running.abort_all();
            while running.join_next().await.is_some() {}
            for job in held.values() {
                if let Err(error) = self.broker.release_job(job, &self.id, Duration::ZERO).await {
                    tracing::warn!(job.id = job.id, %error, "could not hand back job {}", job.id);
                }
            }
        }
        tracing::info!(worker = %self.id, "job worker stopped");
    }

    /// Claims and runs jobs until none is runnable; returns how many ran. For tests and
    /// one-shot use.
    pub async fn run_until_idle(self: &Arc<Self>) -> Result<usize, BrokerError> {
        let mut ran = 0;
        loop {
            let jobs = self.claim(self.settings.concurrency).await?;
            if jobs.is_empty() {
                return Ok(ran);
            }
            ran += jobs.len();
            let mut running = JoinSet::new();
            for job in jobs {
                let worker = self.clone();
                running.spawn(async move { worker.run_job(job).await });
            }
            while running.join_next().await.is_some() {}
        }
    }

    /// Runs one claimed job to an outcome; a panic counts as a failure.
    pub async fn run_job(self: &Arc<Self>, job: Job) -> Outcome {
        let span = tracing::info_span!(
            "job",
            job.id = job.id,
            job.kind = job.kind.as_str(),
            instance.id = %job.instance_id,
            attempt = job.attempts
        );
        self.run_job_in_span(job).instrument(span).await
    }

    async fn run_job_in_span(&self, job: Job) -> Outcome {
        let kind = job.kind;
        let work = AssertUnwindSafe(self.work(&job, kind)).catch_unwind();
        let result = tokio::select! {
            result = work => result,
            never = self.renew_while_running(job.id) => match never {},
        };
        let outcome = match result {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => self.fail(&job, &error).await,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                self.fail(&job, &format!("job panicked: {message}")).await
            }
        };
        self.metrics.count_job(kind.as_str(), outcome.as_str());
        tracing::info!(
            outcome = outcome.as_str(),
            "job {} {}",
            job.id,
            outcome.as_str()
        );
        outcome
    }

    /// Renews the lease every third of its length; never returns.
    async fn renew_while_running(&self, job_id: i64) -> std::convert::Infallible {
        let every = self.settings.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            match self
                .broker
                .renew_lease(job_id, &self.id, self.settings.lease)
                .await
            {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    job.id = job_id,
                    "lost the lease on job {job_id}; another worker may run it too"
                ),
                Err(error) => {
                    tracing::warn!(job.id = job_id, %error, "could not renew the lease on job {job_id}")
                }
            }
        }
    }

    async fn work(&self, job: &Job, kind: JobKind) -> Result<Outcome, String> {
        let Some(instance) = self
            .broker
            .job_instance(job.instance_id)
            .await
            .map_err(|e| e.to_string())?
        else {
            return self.finish(job).await;
        };
        let state = Some(instance.state);
        let Some(provider) = provider(&self.broker, &self.registry, &instance.provider_name).await
        else {
            let reason = format!("provider {} is not registered", instance.provider_name);
            return Ok(self.bury(job, &reason).await);
        };
        match kind {
            JobKind::CreateInstance => {
                if state != Some(State::Creating) {
                    // Deleted or errored before its machine was made: nothing left to do.
                    return self.finish(job).await;
                }
                if job.attempts == 1 {
                    let waited = Utc::now().signed_duration_since(job.created_at);
                    self.metrics
                        .observe_dispatch(waited.to_std().unwrap_or_default());
                }
                let spec = InstanceSpec {
                    image: instance.image.clone(),
                    instance_type: instance.instance_type.clone(),
                    public_ssh_key: instance.public_ssh_key.clone(),
                };
                match provider.create(instance.id, &spec).await {
                    Ok(machine) => {
                        self.broker
                            .record_launched(job, &machine)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok(Outcome::Done)
                    }
                    Err(error) => Ok(self.provider_failed(job, error).await),
                }
            }
            JobKind::RemoveInstance => {
                if state != Some(State::Terminating) {
                    return self.finish(job).await;
                }
                // A create call still running could make the machine after we destroy it.
                if self
                    .broker
                    .create_in_flight(instance.id)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    self.broker
                        .release_job(job, &self.id, Duration::from_secs(1))
                        .await
                        .map_err(|e| e.to_string())?;
                    return Ok(Outcome::Released);
                }
                if let Err(error) = provider.destroy(instance.id).await {
                    return Ok(self.provider_failed(job, error).await);
                }
                match provider.get(instance.id).await {
                    Err(ProviderError::NotFound)
                    | Ok(cloudbrain_provider::CloudInstance {
                        state: CloudState::Terminated,
                        ..
                    }) => {
                        self.broker
                            .record_terminated(job)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok(Outcome::Done)
                    }
                    Ok(_) => Ok(self.fail(job, "the machine is still shutting down").await),
                    Err(error) => Ok(self.provider_failed(job, error).await),
                }
            }
        }
    }

    async fn provider_failed(&self, job: &Job, error: ProviderError) -> Outcome {
        match &error {
            ProviderError::Invalid(message) => {
                self.bury(job, &format!("the provider refused the request: {message}"))
                    .await
            }
            ProviderError::Throttled {
                retry_after: Some(wait),
            } if job.attempts < self.settings.max_attempts => {
                // Honour the cloud's word, plus a little jitter so retries do not stampede.
                let delay = *wait + jittered(*wait / 10);
                self.retry(job, delay, &error.to_string()).await
            }
            _ => self.fail(job, &error.to_string()).await,
        }
    }

    /// Retries with exponential backoff, or buries the job once out of attempts.
    async fn fail(&self, job: &Job, message: &str) -> Outcome {
        if job.attempts >= self.settings.max_attempts {
            let reason = format!("gave up after {} attempts: {message}", job.attempts);
            return self.bury(job, &reason).await;
        }
        let exponent = (job.attempts.max(1) - 1).min(30) as u32;
        let delay = self
            .settings
            .backoff_base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.settings.backoff_max);
        self.retry(job, jittered(delay), message).await
    }

    async fn retry(&self, job: &Job, delay: Duration, message: &str) -> Outcome {
        tracing::warn!(
            job.id = job.id,
            delay_ms = delay.as_millis() as u64,
            error = message,
            "job {} failed; retrying",
            job.id
        );
        match self.broker.retry_job(job, delay, message).await {
            Ok(true) => Outcome::Retried,
            Ok(false) => Outcome::Lost,
            Err(error) => {
                // The lease will run out and another attempt follow: nothing is lost.
                tracing::error!(job.id = job.id, %error, "could not reschedule job {}", job.id);
                Outcome::Retried
            }
        }
    }

    async fn bury(&self, job: &Job, reason: &str) -> Outcome {
        match self.broker.bury_job(job, reason).await {
            Ok(true) => Outcome::Dead,
            Ok(false) => Outcome::Lost,
            Err(error) => {
                tracing::error!(job.id = job.id, %error, "could not record the failure of job {}", job.id);
                Outcome::Retried
            }
        }
    }

    /// Finishes a job with nothing (more) to do.
    async fn finish(&self, job: &Job) -> Result<Outcome, String> {
        match self.broker.finish_job(job).await {
            Ok(true) => Ok(Outcome::Done),
            Ok(false) => Ok(Outcome::Lost),
            Err(error) => Err(error.to_string()),
        }
    }
}
