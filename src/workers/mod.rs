//! The workers: the job worker runs `create` and `remove` jobs (the queue's runner over
//! the job types in [`jobs`]); the refresh worker keeps rows in step with the clouds. Both
//! decide by the broker's rules.

pub mod jobs;
pub mod refresh;
pub mod webhooks;

use std::sync::Arc;

use crate::broker::Broker;
use crate::providers::{LimitedProvider, Registry};

pub use self::jobs::{job_worker, JobContext, JobWorker};
pub use self::refresh::RefreshWorker;
pub use self::webhooks::WebhookSender;

/// A name for this worker, unique across processes: it marks the jobs it leases.
pub fn worker_id(role: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".to_owned());
    format!(
        "{role}:{host}:{}:{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// The live provider named `name`, as its config stands: the registry is brought in step
/// with the stored configs when it misses the name or its last look is stale.
pub(crate) async fn provider(
    broker: &Broker,
    registry: &Registry,
    name: &str,
) -> Option<Arc<LimitedProvider>> {
    if !registry.stale() {
        if let Some(found) = registry.get(name) {
            return Some(found);
        }
    }
    reload(broker, registry).await;
    registry.get(name)
}

/// Brings the registry in step with the stored provider configs.
pub(crate) async fn reload(broker: &Broker, registry: &Registry) {
    match broker.stored_providers().await {
        Ok(stored) => registry.load(stored).await,
        Err(error) => tracing::warn!(%error, "could not read provider configs"),
    }
}
