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

/// A stored provider config, opened. `Debug` leaves the config out: it holds credentials.
#[derive(Clone)]
pub struct StoredProvider {
    /// Its name.
    pub name: String,
    /// Its kind of cloud, as the catalog names it.
    pub kind: String,
    /// Its config document.
    pub config: serde_json::Value,
    /// When it last changed: a live provider built from an older version is rebuilt.
    pub version: chrono::DateTime<chrono::Utc>,
}

impl std::fmt::Debug for StoredProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredProvider")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// How long a registry trusts what it loaded before it looks for changed configs.
pub const RELOAD_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// One live provider and the version of the config it was built from (`None`: put in
/// with [`Registry::insert`], never replaced by a load).
struct Live {
    provider: Arc<LimitedProvider>,
    version: Option<chrono::DateTime<chrono::Utc>>,
}

/// Config name -> live provider, built from the `providers` table and rebuilt when a
/// config changes.
pub struct Registry {
    metrics: Arc<Metrics>,
    providers: RwLock<HashMap<String, Live>>,
    loaded_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Registry {
    /// An empty registry; providers are added by [`Registry::load`] or [`Registry::insert`].
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            providers: RwLock::new(HashMap::new()),
            loaded_at: std::sync::Mutex::new(None),
        }
    }

    /// Brings the live providers in step with `stored`, every config there is: builds the
    /// new ones, rebuilds the changed ones and drops the deleted ones. A config that cannot
    /// be built is logged and skipped (its old build, if any, stays), so one bad row does
    /// not stop the others.
    pub async fn load(&self, stored: Vec<StoredProvider>) {
        let names: std::collections::HashSet<String> =
            stored.iter().map(|p| p.name.clone()).collect();
        for p in stored {
            let current = self.read().get(&p.name).map(|live| live.version);
            match current {
                Some(None) => continue,
                Some(Some(version)) if version == p.version => continue,
                _ => {}
            }
            match build(&p).await {
                Ok((inner, limits)) => {
                    if current.is_some() {
                        tracing::info!(provider = %p.name, "provider {} rebuilt from its changed config", p.name);
                    }
                    self.put(&p.name, inner, limits, Some(p.version));
                }
                Err(error) => {
                    tracing::error!(provider = %p.name, %error, "provider {} cannot be used", p.name);
                }
            }
        }
        self.write()
            .retain(|name, live| live.version.is_none() || names.contains(name));
        *self.loaded_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    }

    /// True when the last load is older than [`RELOAD_AFTER`], or there was none.
    pub fn stale(&self) -> bool {
        self.loaded_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|at| at.elapsed() >= RELOAD_AFTER)
    }

    /// Adds (or replaces) a provider built elsewhere, e.g. a test's; loads never replace it.
    pub fn insert(&self, name: &str, provider: Arc<dyn Provider>, limits: CallLimits) {
        self.put(name, provider, limits, None);
    }

    fn put(
        &self,
        name: &str,
        provider: Arc<dyn Provider>,
        limits: CallLimits,
        version: Option<chrono::DateTime<chrono::Utc>>,
    ) {
        let limited = LimitedProvider::new(name, provider, limits, self.metrics.clone());
        let live = Live {
            provider: Arc::new(limited),
            version,
        };
        self.write().insert(name.to_owned(), live);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Live>> {
        self.providers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Live>> {
        self.providers.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The provider named `name`, if it has been loaded.
    pub fn get(&self, name: &str) -> Option<Arc<LimitedProvider>> {
        self.read().get(name).map(|live| live.provider.clone())
    }

    /// Every loaded provider.
    pub fn all(&self) -> Vec<Arc<LimitedProvider>> {
        let mut all: Vec<_> = self.read().values().map(|l| l.provider.clone()).collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }
}
