//! The refresh worker: per provider config, lists the cloud and brings every row in step,
//! errors stuck launches, and destroys machines no live instance owns. One refresh worker
//! at a time reconciles a given provider config (advisory lock); several may run.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use chrono::Utc;
use cloudbrain_provider::{CloudInstance, Provider};
use tokio::sync::watch;
use uuid::Uuid;

use super::reload;
use crate::broker::lifecycle::{self, RefreshClock};
use crate::broker::Broker;
use crate::config::WorkerSettings;
use crate::db::locks;
use crate::metrics::Metrics;
use crate::providers::{LimitedProvider, Registry};
use crate::shutdown::stopped;

/// What one reconcile of one provider config did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RefreshReport {
    /// Machines the cloud listed.
    pub machines: usize,
    /// Machines destroyed because their instance errored.
    pub destroyed_errored: usize,
    /// Machines destroyed because no live instance owns them.
    pub destroyed_orphans: usize,
    /// Instance rows written (0 when the cloud says nothing new).
    pub written: usize,
    /// True when another refresh worker held this provider config.
    pub skipped: bool,
}

/// Reconciles every provider config on an interval.
pub struct RefreshWorker {
    broker: Broker,
    registry: Arc<Registry>,
    settings: WorkerSettings,
    metrics: Arc<Metrics>,
    /// A session of its own, not the pool's, holds the refresh locks.
    locks: locks::Session,
    /// When each machine without a launch time was first seen without a live instance.
    first_seen: Mutex<HashMap<Uuid, Instant>>,
}

impl RefreshWorker {
    /// A refresh worker over `broker`'s database at `database_url`.
    pub fn new(
        database_url: String,
        broker: Broker,
        registry: Arc<Registry>,
        settings: WorkerSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            broker,
            registry,
            settings,
            metrics,
            locks: locks::Session::new(database_url),
            first_seen: Mutex::new(HashMap::new()),
        }
    }

    /// Reconciles every provider config each interval until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        tracing::info!(
            interval_ms = self.settings.refresh_interval.as_millis() as u64,
            "refresh worker started"
        );
        loop {
            let began = Instant::now();
            self.refresh_all().await;
            self.reconcile_pools().await;
            self.metrics.observe_refresh_cycle(began.elapsed());
            tokio::select! {
                _ = tokio::time::sleep(self.settings.refresh_interval.max(MIN_INTERVAL)) => {}
                _ = stopped(&mut shutdown) => break,
            }
        }
        tracing::info!("refresh worker stopped");
    }

    /// Brings every pool to its size once (the broker decides how; see
    /// `broker::pools::plan`); a failure is logged and retried next cycle.
    pub async fn reconcile_pools(&self) -> Vec<(String, crate::broker::pools::Plan)> {
        match self.broker.reconcile_pools().await {
            Ok(done) => done,
            Err(error) => {
                tracing::warn!(%error, "pools not reconciled this cycle");
                Vec::new()
            }
        }
    }

    /// Reconciles every provider config once.
    pub async fn refresh_all(&self) -> Vec<(String, RefreshReport)> {
        reload(&self.broker, &self.registry).await;
        let mut reports = Vec::new();
        for provider in self.registry.all() {
            match self.refresh(&provider).await {
                Ok(report) => reports.push((provider.name().to_owned(), report)),
                Err(error) => {
                    tracing::warn!(provider = %provider.name(), error = %format!("{error:#}"), "refresh of {} failed", provider.name());
                }
            }
        }
        reports
    }

    /// Reconciles one provider config, unless another refresh worker is at it.
    pub async fn refresh(&self, provider: &LimitedProvider) -> anyhow::Result<RefreshReport> {
        if !self.locks.try_lock_refresh(provider.name()).await? {
            return Ok(RefreshReport {
                skipped: true,
                ..RefreshReport::default()
            });
        }
        let began = Instant::now();
        let result = self.reconcile(provider).await;
        if let Ok(report) = &result {
            tracing::debug!(
                provider = %provider.name(),
                "refreshed {}: {} machines, {} rows written in {:.1} ms",
                provider.name(),
                report.machines,
                report.written,
                began.elapsed().as_secs_f64() * 1000.0
            );
        }
        if let Err(error) = self.locks.unlock_refresh(provider.name()).await {
            tracing::warn!(%error, "could not release the refresh lock");
        }
        result
    }

    async fn reconcile(&self, provider: &LimitedProvider) -> anyhow::Result<RefreshReport> {
        // The cloud is listed before the rows are read: a machine in the list was made by a
        // job whose instance row had already committed, so it is never taken for an orphan.
        // A row recorded after the listing began is spared by `lifecycle::refresh` instead.
        let listed_at = self.broker.db_now().await?;
        let machines = provider.list().await?;
        let rows = self.broker.live_instances(provider.name()).await?;
        let clock = RefreshClock {
            listed_at,
            now: Utc::now(),
            launch_timeout: self.settings.launch_timeout,
        };
        let by_id: HashMap<Uuid, &CloudInstance> = machines.iter().map(|m| (m.id, m)).collect();
        let mut report = RefreshReport {
            machines: machines.len(),
            ..RefreshReport::default()
        };
        // Every row is compared with its machine in memory; only the differences are
        // written, in batches, before any machine is destroyed.
        let owned: HashSet<Uuid> = rows.iter().map(|row| row.id.0).collect();
        let decisions: Vec<_> = rows
            .iter()
            .map(|row| {
                let machine = by_id.get(&row.id.0).copied();
                (row.id, lifecycle::refresh(row, machine, &clock))
            })
            .collect();
        report.written = self.broker.apply_all(&decisions).await?;
        for (id, decision) in &decisions {
            if decision.destroys_machine() && by_id.contains_key(&id.0) {
                self.destroy(provider, id.0, "its instance errored").await;
                report.destroyed_errored += 1;
            }
        }
        let orphans = self.orphans(&machines, &owned);
        for id in orphans {
            self.destroy(provider, id, "it belongs to no live instance")
                .await;
            report.destroyed_orphans += 1;
        }
        Ok(report)
    }

    /// Machines no live instance owns that are past the grace period.
    fn orphans(&self, machines: &[CloudInstance], owned: &HashSet<Uuid>) -> Vec<Uuid> {
        let now = Instant::now();
        let mut first_seen = self.first_seen.lock().unwrap_or_else(|e| e.into_inner());
        let listed: HashSet<Uuid> = machines.iter().map(|m| m.id).collect();
        first_seen.retain(|id, _| listed.contains(id) && !owned.contains(id));
        machines
            .iter()
            .filter(|m| !owned.contains(&m.id))
            .filter(|m| {
                let age = match m.launched_at {
                    Some(at) => SystemTime::now().duration_since(at).unwrap_or_default(),
                    None => now.duration_since(*first_seen.entry(m.id).or_insert(now)),
                };
                age >= self.settings.orphan_grace
            })
            .map(|m| m.id)
            .collect()
    }

    async fn destroy(&self, provider: &LimitedProvider, id: Uuid, why: &str) {
        match provider.destroy(id).await {
            Ok(()) => {
                tracing::info!(instance.id = %id, provider = %provider.name(), "destroyed machine of {id}: {why}")
            }
            Err(error) => {
                tracing::warn!(instance.id = %id, %error, "could not destroy machine of {id} ({why}); next refresh retries")
            }
        }
    }
}

/// How long to wait between refreshes when the interval is zero: not a busy loop.
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);
