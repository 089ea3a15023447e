//! The jobs, as types: [`CreateInstance`] makes an instance's machine, [`RemoveInstance`]
//! destroys it, [`AuthorizeKey`] puts a caller's key on the warm machine it took. Each
//! runs with no transaction or pooled connection held while the provider is called,
//! decides through [`crate::broker::lifecycle`], and finishes its job in the transaction
//! that writes the decision. [`JobContext`] is what they run with, and the [`Handler`]
//! the queue's runner calls.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use cloudbrain_provider::{Drain, InstanceSpec, Provider, ProviderError};

use crate::broker::model::Instance;
use crate::broker::{lifecycle, Broker, BrokerError, ClaimedRows};
use crate::metrics::Metrics;
use crate::providers::{LimitedProvider, Registry};
use crate::queue::{Claim, Handler, JobError, JobKind, Lease, Queue};

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
    /// The instance `lease` works on (as its claim read it, else read now) and its live
    /// provider, or `None` when the job has nothing (more) to do and was finished.
    async fn instance(
        &self,
        lease: &Lease,
        claimed: &ClaimedRows,
        wanted: fn(&Instance) -> bool,
    ) -> Result<Option<(Instance, Arc<LimitedProvider>)>, JobError> {
        let instance = match claimed.instance(lease.instance_id) {
            Some(read) => Some(read.clone()),
            None => self.broker.job_instance(lease.instance_id).await?,
        };
        let Some(instance) = instance.filter(wanted) else {
            // Gone, or moved on (deleted or errored before its machine was made).
            return match self.queue.finish(lease).await.map_err(JobError::Store)? {
                true => Ok(None),
                false => Err(JobError::Lost),
            };
        };
        let provider = self.provider(&instance.provider_name).await?;
        Ok(Some((instance, provider)))
    }

    /// The live provider named `name`.
    async fn provider(&self, name: &str) -> Result<Arc<LimitedProvider>, JobError> {
        super::provider(&self.broker, &self.providers, name)
            .await
            .ok_or_else(|| JobError::Refused(format!("provider {name} is not registered")))
    }
}

/// Most offerings one create job moves through before it hands the instance back to
/// the queue.
const MAX_MOVES: usize = 32;

/// How often a machine being drained is looked at again.
const DRAIN_POLL: Duration = Duration::from_secs(5);

/// Makes the machine for an instance still `creating`.
pub struct CreateInstance<'a>(pub &'a Lease, pub &'a ClaimedRows);

impl CreateInstance<'_> {
    /// Asks the cloud for the machine and records what it made.
    pub async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let (lease, claimed) = (self.0, self.1);
        let Some((instance, provider)) = ctx
            .instance(lease, claimed, |i| lifecycle::create_wanted(i.state))
            .await?
        else {
            return Ok(());
        };
        if lease.attempts == 1 {
            let waited = Utc::now().signed_duration_since(lease.enqueued_at);
            ctx.metrics
                .observe_dispatch(waited.to_std().unwrap_or_default());
        }
        // Each offering that has no room is marked so and the next one tried, until one
        // makes the machine or none is left (then the job is retried, counted).
        let mut provider = provider;
        let mut instance = instance;
        let mut tried = 0;
        // The first placement goes by what the claim read; one after a move, by a new read.
        let mut known = claimed.placing();
        loop {
            let Some(offering) = ctx.broker.place(&instance, known.take()).await? else {
                return Err(JobError::NotYet(
                    "every offering of this instance is out of capacity".to_owned(),
                ));
            };
            if offering.provider != provider.name() {
                provider = ctx.provider(&offering.provider).await?;
            }
            let spec = InstanceSpec {
                image: instance.image.clone(),
                instance_type: offering.instance_type.clone(),
                public_ssh_key: instance.public_ssh_key.clone(),
                placement: offering.placement.clone(),
            };
            match provider.create(instance.id.0, &spec).await {
                Ok(machine) => {
                    ctx.broker
                        .finish_with(lease, &lifecycle::launched(&machine))
                        .await?;
                    return Ok(());
                }
                Err(ProviderError::Capacity(reason)) if tried < MAX_MOVES => {
                    ctx.broker.out_of_capacity(&offering, &reason).await?;
                    tried += 1;
                    // Read again: where it stands now, and what it was asked for.
                    match ctx.broker.job_instance(instance.id).await? {
                        Some(fresh) if lifecycle::create_wanted(fresh.state) => instance = fresh,
                        _ => return Err(ProviderError::Capacity(reason).into()),
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// Destroys the machine of an instance that is `terminating`.
pub struct RemoveInstance<'a>(pub &'a Lease, pub &'a ClaimedRows);

impl RemoveInstance<'_> {
    /// Destroys the machine, checks that it is gone, and records the instance terminated.
    pub async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let (lease, claimed) = (self.0, self.1);
        let Some((instance, provider)) = ctx
            .instance(lease, claimed, |i| lifecycle::remove_wanted(i.state))
            .await?
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
                what: "the create call still running".into(),
                delay: Duration::from_secs(1),
            });
        }
        // Work still on the machine (ECS tasks) may finish first, for as long as the
        // provider allows, counted from when the instance was given up.
        if let Drain::Draining { what, at_most } = provider.drain(instance.id.0).await? {
            let waited = Utc::now().signed_duration_since(lease.enqueued_at);
            if waited.to_std().unwrap_or_default() < at_most {
                return Err(JobError::Wait {
                    what: what.into(),
                    delay: DRAIN_POLL,
                });
            }
            tracing::warn!(instance.id = %instance.id, "destroying it after {} s of draining: {what}", at_most.as_secs());
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

/// Puts the caller's key on the warm machine it took, then it runs again.
pub struct AuthorizeKey<'a>(pub &'a Lease, pub &'a ClaimedRows);

impl AuthorizeKey<'_> {
    /// Asks the cloud to let the key in, and records the instance running.
    pub async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let (lease, claimed) = (self.0, self.1);
        let Some((instance, provider)) =
            ctx.instance(lease, claimed, lifecycle::key_wanted).await?
        else {
            return Ok(());
        };
        let Some(key) = instance.public_ssh_key.as_deref() else {
            return Err(JobError::Refused("no key to put on the machine".into()));
        };
        provider.authorize_key(instance.id.0, key).await?;
        ctx.broker
            .finish_with(lease, &lifecycle::Decision::KeyAuthorized)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Handler for JobContext {
    type Claimed = ClaimedRows;

    /// The claim, its instances and (when it may hold a create) what placing goes by:
    /// one wait for the whole claim ([`Broker::claim`]).
    async fn claim(&self, claim: &Claim<'_>) -> anyhow::Result<(Vec<Lease>, ClaimedRows)> {
        let placing = claim.kinds.contains(&JobKind::CreateInstance);
        Ok(self.broker.claim(claim, placing).await?)
    }

    async fn run(&self, lease: &Lease, claimed: &ClaimedRows) -> Result<(), JobError> {
        match lease.kind {
            JobKind::CreateInstance => CreateInstance(lease, claimed).run(self).await,
            JobKind::RemoveInstance => RemoveInstance(lease, claimed).run(self).await,
            JobKind::AuthorizeKey => AuthorizeKey(lease, claimed).run(self).await,
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
        &[
            JobKind::CreateInstance,
            JobKind::RemoveInstance,
            JobKind::AuthorizeKey,
        ],
        metrics,
        settings,
    )
}
