//! The jobs, as types: [`CreateInstance`] makes an instance's machine, [`RemoveInstance`]
//! destroys it. Each runs with no transaction or pooled connection held while the
//! provider is called, decides through [`crate::broker::lifecycle`], and finishes its job
//! in the transaction that writes the decision. [`JobContext`] is what they run with, and
//! the [`Handler`] the queue's runner calls.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use cloudbrain_provider::{InstanceSpec, Provider, ProviderError};

use crate::broker::model::Instance;
use crate::broker::{lifecycle, Broker, BrokerError};
use crate::metrics::Metrics;
use crate::providers::{LimitedProvider, Registry};
use crate::queue::{Handler, JobError, JobKind, Lease, Queue};

impl From<BrokerError> for JobError {
    fn from(error: BrokerError) -> Self {
        JobError::Store(anyhow::Error::new(error))
    }
}

/// What jobs run with.
pub struct JobContext {
    /// The rules and the rows.
    pub broker: Broker,
    /// The queue, for jobs with nothing to write.
    pub queue: Queue,
    /// The live providers.
    pub providers: Arc<Registry>,
    /// What the process measures.
    pub metrics: Arc<Metrics>,
}

impl JobContext {
    /// The instance `lease` works on and its live provider, or `None` when the job has
    /// nothing (more) to do and was finished.
    async fn instance(
        &self,
        lease: &Lease,
        wanted: fn(crate::broker::State) -> bool,
    ) -> Result<Option<(Instance, Arc<LimitedProvider>)>, JobError> {
        let instance = self.broker.job_instance(lease.instance_id).await?;
        let Some(instance) = instance.filter(|i| wanted(i.state)) else {
            // Gone, or moved on (deleted or errored before its machine was made).
            return match self.queue.finish(lease).await.map_err(JobError::Store)? {
                true => Ok(None),
                false => Err(JobError::Lost),
            };
        };
        let Some(provider) =
            super::provider(&self.broker, &self.providers, &instance.provider_name).await
        else {
            let reason = format!("provider {} is not registered", instance.provider_name);
            return Err(JobError::Refused(reason));
        };
        Ok(Some((instance, provider)))
    }
}

/// Makes the machine for an instance still `creating`.
pub struct CreateInstance<'a>(pub &'a Lease);

impl CreateInstance<'_> {
    /// Asks the cloud for the machine and records what it made.
    pub async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let lease = self.0;
        let Some((instance, provider)) = ctx.instance(lease, lifecycle::create_wanted).await?
        else {
            return Ok(());
        };
        if lease.attempts == 1 {
            let waited = Utc::now().signed_duration_since(lease.enqueued_at);
            ctx.metrics
                .observe_dispatch(waited.to_std().unwrap_or_default());
        }
        let spec = InstanceSpec {
            image: instance.image,
            instance_type: instance.instance_type,
            public_ssh_key: instance.public_ssh_key,
        };
        let machine = provider.create(instance.id.0, &spec).await?;
        ctx.broker
            .finish_with(lease, &lifecycle::launched(&machine))
            .await?;
        Ok(())
    }
}

/// Destroys the machine of an instance that is `terminating`.
pub struct RemoveInstance<'a>(pub &'a Lease);

impl RemoveInstance<'_> {
    /// Destroys the machine, checks that it is gone, and records the instance terminated.
    pub async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let lease = self.0;
        let Some((instance, provider)) = ctx.instance(lease, lifecycle::remove_wanted).await?
        else {
            return Ok(());
        };
        // A create call still running could make the machine after we destroy it.
        if ctx
            .queue
            .create_in_flight(instance.id)
            .await
            .map_err(JobError::Store)?
        {
            return Err(JobError::Wait {
                what: "the create call still running",
                delay: Duration::from_secs(1),
            });
        }
        provider.destroy(instance.id.0).await?;
        let left = match provider.get(instance.id.0).await {
            Ok(machine) => Some(machine.state),
            Err(ProviderError::NotFound) => None,
            Err(error) => return Err(error.into()),
        };
        match lifecycle::removed(left.as_ref()) {
            lifecycle::Decision::NotYet(why) => Err(JobError::NotYet(why)),
            decision => Ok(ctx.broker.finish_with(lease, &decision).await?),
        }
    }
}

#[async_trait]
impl Handler for JobContext {
    async fn run(&self, lease: &Lease) -> Result<(), JobError> {
        match lease.kind {
            JobKind::CreateInstance => CreateInstance(lease).run(self).await,
            JobKind::RemoveInstance => RemoveInstance(lease).run(self).await,
        }
    }

    async fn bury(&self, lease: &Lease, reason: &str) -> anyhow::Result<bool> {
        Ok(self.broker.bury(lease, reason).await?)
    }
}

/// The job worker: the queue's runner over [`JobContext`], for create and remove jobs.
pub type JobWorker = crate::queue::Runner<JobContext>;

/// A job worker named `id`.
pub fn job_worker(
    id: String,
    context: JobContext,
    settings: crate::config::WorkerSettings,
) -> JobWorker {
    let queue = context.queue.clone();
    let metrics = context.metrics.clone();
    crate::queue::Runner::new(
        id,
        queue,
        Arc::new(context),
        &[JobKind::CreateInstance, JobKind::RemoveInstance],
        metrics,
        settings,
    )
}
