//! Call limits: a live provider behind its config's concurrency and rate limits, each
//! call timed in the metrics.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudbrain_provider::{CallLimits, CloudInstance, InstanceSpec, Provider, ProviderError};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::metrics::Metrics;

/// A token bucket: at most `rate` starts per second, bursts of up to one second's worth.
struct RateLimiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    fn new(rate: f64) -> Self {
        Self {
            rate,
            state: Mutex::new((rate.max(1.0), Instant::now())),
        }
    }

    async fn acquire(&self) {
        loop {
            let wait = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let (tokens, last) = &mut *state;
                let now = Instant::now();
                *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate)
                    .min(self.rate.max(1.0));
                *last = now;
                if *tokens >= 1.0 {
                    *tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - *tokens) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A provider behind its config's limits: at most `max_concurrency` calls in flight and
/// `rate_limit` calls started per second in this process, each call timed in the metrics.
pub struct LimitedProvider {
    name: String,
    inner: Arc<dyn Provider>,
    slots: Semaphore,
    rate: RateLimiter,
    metrics: Arc<Metrics>,
}

fn error_kind(err: &ProviderError) -> &'static str {
    match err {
        ProviderError::NotFound => "not_found",
        ProviderError::Throttled { .. } => "throttled",
        ProviderError::Capacity(_) => "capacity",
        ProviderError::Invalid(_) => "invalid",
        ProviderError::Transient(_) => "transient",
    }
}

impl LimitedProvider {
    /// Wraps `inner`, named `name`, in `limits`.
    pub fn new(
        name: &str,
        inner: Arc<dyn Provider>,
        limits: CallLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            inner,
            slots: Semaphore::new(limits.max_concurrency),
            rate: RateLimiter::new(limits.rate_limit),
            metrics,
        }
    }

    /// The provider config's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn call<T, F>(&self, operation: &'static str, call: F) -> Result<T, ProviderError>
    where
        F: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_closed| ProviderError::Transient("provider is shutting down".into()))?;
        self.rate.acquire().await;
        let started = Instant::now();
        let result = call.await;
        // NotFound is an answer, not a failure of the call.
        let failed = result
            .as_ref()
            .err()
            .filter(|e| !matches!(e, ProviderError::NotFound))
            .map(error_kind);
        self.metrics
            .observe_provider_call(&self.name, operation, started.elapsed(), failed);
        result
    }
}

#[async_trait]
impl Provider for LimitedProvider {
    #[tracing::instrument(level = "debug", skip(self, spec), fields(provider = %self.name, instance.id = %id))]
    async fn create(&self, id: Uuid, spec: &InstanceSpec) -> Result<CloudInstance, ProviderError> {
        self.call("create", self.inner.create(id, spec)).await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(provider = %self.name, instance.id = %id))]
    async fn get(&self, id: Uuid) -> Result<CloudInstance, ProviderError> {
        self.call("get", self.inner.get(id)).await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(provider = %self.name))]
    async fn list(&self) -> Result<Vec<CloudInstance>, ProviderError> {
        self.call("list", self.inner.list()).await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(provider = %self.name, instance.id = %id))]
    async fn destroy(&self, id: Uuid) -> Result<(), ProviderError> {
        self.call("destroy", self.inner.destroy(id)).await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(provider = %self.name, instance.id = %id))]
    async fn drain(&self, id: Uuid) -> Result<cloudbrain_provider::Drain, ProviderError> {
        self.call("drain", self.inner.drain(id)).await
    }

    #[tracing::instrument(level = "debug", skip(self, key), fields(provider = %self.name, instance.id = %id))]
    async fn authorize_key(&self, id: Uuid, key: &str) -> Result<(), ProviderError> {
        self.call("authorize_key", self.inner.authorize_key(id, key))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rate_limiter_spaces_calls_after_a_burst() {
        let limiter = RateLimiter::new(20.0);
        let started = Instant::now();
        for _ in 0..30 {
            limiter.acquire().await;
        }
        // 20 at once, then 10 more at 20 per second: about half a second.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(450), "{took:?}");
    }
}
