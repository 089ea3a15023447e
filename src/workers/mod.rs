//! The workers: the job worker runs `create` and `remove` jobs; the refresh worker keeps
//! rows in step with the clouds. Both are front ends of the broker's rules.

pub mod jobs;
pub mod refresh;

use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::providers::{LimitedProvider, Registry};

pub use self::jobs::JobWorker;
pub use self::refresh::RefreshWorker;

/// A name for this worker, unique across processes: it marks the jobs it leases.
pub fn worker_id(role: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".to_owned());
    format!(
        "{role}:{host}:{}:{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// The live provider named `name`, loading provider configs registered since the last look.
pub(crate) async fn provider(
    broker: &Broker,
    registry: &Registry,
    name: &str,
) -> Option<Arc<LimitedProvider>> {
    if let Some(found) = registry.get(name) {
        return Some(found);
    }
    reload(broker, registry).await;
    registry.get(name)
}

/// Loads provider configs registered since the last look.
pub(crate) async fn reload(broker: &Broker, registry: &Registry) {
    match broker.stored_providers().await {
        Ok(stored) => registry.load(stored).await,
        Err(error) => tracing::warn!(%error, "could not read provider configs"),
    }
}

/// Waits until `shutdown` says stop (or its sender is gone).
pub async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// A delay with jitter: between half and all of `delay`, so retries spread out.
pub(crate) fn jittered(delay: Duration) -> Duration {
    use rand::Rng;
    delay.mul_f64(rand::rng().random_range(0.5..=1.0))
}
