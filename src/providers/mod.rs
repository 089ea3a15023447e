//! Providers, as the broker uses them: the [`catalog`] of kinds of cloud, the call
//! [`limits`] every live provider runs behind, and the [`Registry`] of live providers the
//! workers call, built from the stored configs (see `broker::providers`).

pub mod catalog;
pub mod limits;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use cloudbrain_provider::{CallLimits, ConfigError, Provider};

pub use self::limits::LimitedProvider;
use crate::metrics::Metrics;

/// Makes the live provider for a stored config, with its call limits.
async fn build(stored: &StoredProvider) -> Result<(Arc<dyn Provider>, CallLimits), ConfigError> {
    let factory = catalog::find(&stored.kind)?;
    let offer = factory.check(&stored.config)?;
    let provider = factory.build(&stored.name, &stored.config).await?;
    Ok((provider, offer.limits))
}

/// A stored provider config, opened.
#[derive(Debug, Clone)]
pub struct StoredProvider {
    /// Its name.
    pub name: String,
    /// Its kind of cloud, as the catalog names it.
    pub kind: String,
    /// Its config document.
    pub config: serde_json::Value,
}

/// Config name -> live provider, built on first need from the `providers` table.
pub struct Registry {
    metrics: Arc<Metrics>,
    providers: RwLock<HashMap<String, Arc<LimitedProvider>>>,
}

impl Registry {
    /// An empty registry; providers are added by [`Registry::load`] or [`Registry::insert`].
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
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
            match build(&p).await {
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
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }
}
