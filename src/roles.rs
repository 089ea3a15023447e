//! The process roles — the API, the job worker, the refresh worker — each runnable alone
//! (`cloudbrain http`, `create-worker`, `refresh-worker`) or together (`cloudbrain dev`).

use std::net::TcpListener;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;

use crate::api;
use crate::auth::TokenVerifier;
use crate::broker::stream::Hub;
use crate::broker::Broker;
use crate::config::Config;
use crate::db::{self, Pool};
use crate::metrics::Metrics;
use crate::providers::Registry;
use crate::queue::Queue;
use crate::shutdown::stopped;
use crate::workers::{self, JobContext, RefreshWorker, WebhookSender};

/// What every role of one process shares.
#[derive(Clone)]
pub struct Services {
    /// The settings.
    pub config: Config,
    /// The database pool.
    pub pool: Pool,
    /// What the pool is made of, for the API's pools of one per worker thread.
    pub pool_settings: db::PoolSettings,
    /// The business rules.
    pub broker: Broker,
    /// What this process measures.
    pub metrics: Arc<Metrics>,
    /// Live providers, for the workers.
    pub registry: Arc<Registry>,
}

impl Services {
    /// Builds the shared parts from `config` for a process whose role pools
    /// `default_pool_size` connections unless `CLOUDBRAIN_DATABASE_POOL_SIZE` says
    /// otherwise; needs the encryption key.
    pub fn new(config: Config, default_pool_size: usize) -> anyhow::Result<Self> {
        let key = config.require_encryption_key()?.clone();
        let statements = if config.behind_transaction_pooler() {
            db::Statements::Unnamed
        } else {
            db::Statements::Prepared
        };
        let pool_settings = db::PoolSettings {
            url: config.database_url.clone(),
            size: config.pool_size.unwrap_or(default_pool_size),
            statements,
        };
        let pool = pool_settings.build()?;
        tracing::info!(
            connections = pool_settings.size,
            "pooling up to {} database connections",
            pool_settings.size
        );
        let metrics = Arc::new(Metrics::default());
        let registry = Arc::new(Registry::new(metrics.clone()));
        Ok(Self {
            broker: Broker::new(pool.clone(), key).with_max_lifetime(config.max_lifetime),
            config,
            pool,
            pool_settings,
            metrics,
            registry,
        })
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn termination_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Serves the API on `listener` until `shutdown`, then drains requests in flight.
pub async fn http(
    services: &Services,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let verifier = Arc::new(TokenVerifier::with_limits(
        services.pool.clone(),
        services.config.auth_cache_ttl,
        services.config.scrypt,
    ));
    let listener_task = tokio::spawn(
        verifier
            .clone()
            .listen_for_revocations(services.config.direct_database_url().to_owned()),
    );
    let addr = listener.local_addr()?;
    let stream = Hub::new(services.broker.clone(), services.config.stream_heartbeat);
    let stream_task = tokio::spawn(
        stream
            .clone()
            .run(services.config.direct_database_url().to_owned()),
    );
    let state = api::AppState {
        broker: services.broker.clone(),
        verifier,
        request_timeout: services.config.request_timeout,
        body_timeout: services.config.body_timeout,
        trusted_proxies: services.config.trusted_proxies.clone(),
        metrics: services.metrics.clone(),
        stream: stream.clone(),
        webhook_networks: services.config.webhooks.allowed.clone(),
        worker_pools: Some(services.pool_settings.clone()),
    };
    let server = api::serve(listener, state, services.config.shutdown_timeout)?;
    let handle = server.handle();
    tracing::info!(%addr, "cloudbrain http listening on http://{addr}");
    let stopper = tokio::spawn(async move {
        stopped(&mut shutdown).await;
        // Streams never end by themselves: end them, so that they do not hold the drain.
        stream.close();
        handle.stop(true).await;
    });
    let result = server.await;
    stopper.abort();
    listener_task.abort();
    stream_task.abort();
    tracing::info!("cloudbrain http stopped");
    result.context("serving http")
}

/// Serves `/metrics` for a worker process when `CLOUDBRAIN_METRICS_ADDR` is set.
fn worker_metrics(services: &Services) -> anyhow::Result<Option<actix_web::dev::ServerHandle>> {
    let Some(addr) = services.config.metrics_addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    let server = api::serve_metrics(listener, services.broker.clone(), services.metrics.clone())?;
    let handle = server.handle();
    tokio::spawn(server);
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    Ok(Some(handle))
}

/// Runs a worker role, with its own `/metrics` server when asked and configured.
async fn with_metrics(
    services: &Services,
    serve_metrics: bool,
    role: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics_server = if serve_metrics {
        worker_metrics(services)?
    } else {
        None
    };
    role.await;
    if let Some(handle) = metrics_server {
        handle.stop(false).await;
    }
    Ok(())
}

/// Runs create and remove jobs until `shutdown`.
pub async fn job_worker(
    services: &Services,
    shutdown: watch::Receiver<bool>,
    serve_metrics: bool,
) -> anyhow::Result<()> {
    let context = JobContext {
        broker: services.broker.clone(),
        queue: Queue::new(services.pool.clone()),
        providers: services.registry.clone(),
        metrics: services.metrics.clone(),
    };
    let worker = Arc::new(workers::job_worker(
        workers::worker_id("create-worker"),
        context,
        services.config.workers.clone(),
    ));
    // LISTEN needs a session of its own: the direct URL.
    let database_url = services.config.direct_database_url().to_owned();
    // The same process sends webhook deliveries.
    let sender = Arc::new(WebhookSender::new(
        services.broker.clone(),
        services.config.webhooks.clone(),
        services.config.workers.concurrency,
    ));
    let sending = tokio::spawn(sender.run(database_url.clone(), shutdown.clone()));
    let result = with_metrics(services, serve_metrics, worker.run(database_url, shutdown)).await;
    let _ = sending.await;
    result
}

/// Reconciles every provider config on an interval until `shutdown`.
pub async fn refresh_worker(
    services: &Services,
    shutdown: watch::Receiver<bool>,
    serve_metrics: bool,
) -> anyhow::Result<()> {
    let worker = Arc::new(RefreshWorker::new(
        services.config.direct_database_url().to_owned(),
        services.broker.clone(),
        services.registry.clone(),
        services.config.workers.clone(),
        services.metrics.clone(),
    ));
    with_metrics(services, serve_metrics, worker.run(shutdown)).await
}
