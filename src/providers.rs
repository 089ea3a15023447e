//! Provider configs and the registry: which kinds of cloud exist, what a stored config
//! offers, and, for the workers, config name -> a live `Provider` behind its call limits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudbrain_provider::{
    CallLimits, CloudInstance, ConfigError, InstanceSpec, Provider, ProviderError,
};
use cloudbrain_provider_ec2::{Ec2Config, Ec2Provider};
use cloudbrain_provider_fake::{FakeCloud, FakeConfig};
use cloudbrain_provider_gce::{GceConfig, GceProvider};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::metrics::Metrics;

/// The kinds of cloud a provider config can describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// The fake cloud, for development, tests and benchmarks.
    Fake,
    /// Amazon EC2.
    Ec2,
    /// Google Compute Engine.
    Gce,
}

impl ProviderKind {
    /// The value stored in `providers.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Fake => "fake",
            ProviderKind::Ec2 => "ec2",
            ProviderKind::Gce => "gce",
        }
    }

    /// Reads a stored type name.
    pub fn parse(value: &str) -> Option<Self> {
        [ProviderKind::Fake, ProviderKind::Ec2, ProviderKind::Gce]
            .into_iter()
            .find(|k| k.as_str() == value)
    }
}

/// What the broker needs to know of a provider config to accept requests for it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSettings {
    /// The instance type names it offers.
    pub instance_types: Vec<String>,
    /// The type a request gets when it names none, or `default`.
    pub default_instance_type: String,
    /// Limits on calls to its cloud.
    pub limits: CallLimits,
}

/// Checks a config document for `kind` and returns what the broker needs of it.
pub fn settings(
    kind: ProviderKind,
    config: &serde_json::Value,
) -> Result<ProviderSettings, ConfigError> {
    match kind {
        ProviderKind::Fake => {
            let config = FakeConfig::parse(config)?;
            Ok(ProviderSettings {
                limits: config.limits(),
                default_instance_type: config.default_type()?,
                instance_types: config.instance_types,
            })
        }
        ProviderKind::Ec2 => {
            let config = Ec2Config::parse(config)?;
            Ok(ProviderSettings {
                limits: config.limits(),
                default_instance_type: config.default_type()?,
                instance_types: config.instance_types.keys().cloned().collect(),
            })
        }
        ProviderKind::Gce => {
            let config = GceConfig::parse(config)?;
            Ok(ProviderSettings {
                limits: config.limits(),
                default_instance_type: config.default_type()?,
                instance_types: config.machine_types.keys().cloned().collect(),
            })
        }
    }
}

/// What a provider needs from the process that runs it.
#[derive(Debug, Clone)]
pub struct ProviderContext {
    /// The broker's database; the fake cloud keeps its machines there, in its own schema.
    pub database_url: String,
}

/// Makes the live provider for a stored config.
pub async fn build(
    kind: ProviderKind,
    name: &str,
    config: &serde_json::Value,
    context: &ProviderContext,
) -> Result<(Arc<dyn Provider>, CallLimits), ConfigError> {
    match kind {
        ProviderKind::Fake => {
            let config = FakeConfig::parse(config)?;
            let limits = config.limits();
            Ok((
                Arc::new(FakeCloud::new(name, config, &context.database_url)),
                limits,
            ))
        }
        ProviderKind::Ec2 => {
            let config = Ec2Config::parse(config)?;
            let limits = config.limits();
            Ok((Arc::new(Ec2Provider::new(name, config).await), limits))
        }
        ProviderKind::Gce => {
            let config = GceConfig::parse(config)?;
            let limits = config.limits();
            let provider = GceProvider::new(name, config)
                .await
                .map_err(|e| ConfigError::new("credentials", e.to_string()))?;
            Ok((Arc::new(provider), limits))
        }
    }
}

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
            .map_err(|_| ProviderError::Transient("provider is shutting down".into()))?;
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
    async fn create(&self, id: Uuid, spec: &InstanceSpec) -> Result<CloudInstance, ProviderError> {
        self.call("create", self.inner.create(id, spec)).await
    }

    async fn get(&self, id: Uuid) -> Result<CloudInstance, ProviderError> {
        self.call("get", self.inner.get(id)).await
    }

    async fn list(&self) -> Result<Vec<CloudInstance>, ProviderError> {
        self.call("list", self.inner.list()).await
    }

    async fn destroy(&self, id: Uuid) -> Result<(), ProviderError> {
        self.call("destroy", self.inner.destroy(id)).await
    }
}

/// A stored provider config, opened.
#[derive(Debug, Clone)]
pub struct StoredProvider {
    /// Its name.
    pub name: String,
    /// Its kind of cloud.
    pub kind: ProviderKind,
    /// Its config document.
    pub config: serde_json::Value,
}

/// Config name -> live provider, built on first need from the `providers` table.
pub struct Registry {
    context: ProviderContext,
    metrics: Arc<Metrics>,
    providers: RwLock<HashMap<String, Arc<LimitedProvider>>>,
}

impl Registry {
    /// An empty registry; providers are added by [`Registry::load`] or [`Registry::insert`].
    pub fn new(context: ProviderContext, metrics: Arc<Metrics>) -> Self {
        Self {
            context,
            metrics,
            providers: RwLock::new(HashMap::new()),
        }
    }

    /// Builds the providers in `stored` not built yet; a config that cannot be built is
    /// logged and skipped, so one bad row does not stop the others.
    pub async fn load(&self, stored: Vec<StoredProvider>) {
        for p in stored {
            if self.get(&p.name).is_some() {
                continue;
            }
            match build(p.kind, &p.name, &p.config, &self.context).await {
                Ok((inner, limits)) => self.insert(&p.name, inner, limits),
                Err(error) => {
                    tracing::error!(provider = %p.name, %error, "provider {} cannot be used", p.name);
                }
            }
        }
    }

    /// Adds (or replaces) a provider built elsewhere, e.g. a test's.
    pub fn insert(&self, name: &str, provider: Arc<dyn Provider>, limits: CallLimits) {
        let limited = LimitedProvider::new(name, provider, limits, self.metrics.clone());
        self.providers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), Arc::new(limited));
    }

    /// The provider named `name`, if it has been loaded.
    pub fn get(&self, name: &str) -> Option<Arc<LimitedProvider>> {
        self.providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every loaded provider.
    pub fn all(&self) -> Vec<Arc<LimitedProvider>> {
        let mut all: Vec<_> = self
            .providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
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
