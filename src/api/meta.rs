//! Routes about the service itself: health, readiness, version, providers, OpenAPI.

use actix_web::{web, HttpResponse};
use serde::Serialize;

use super::error::ApiError;
use super::openapi::{PoolShape, ProviderShape, TokenRefusals};
use super::wire::ErrorBody;
use super::AppState;
use crate::auth::Caller;
use crate::broker::providers::ProviderSummary;
use crate::broker::validate::Lifetime;

/// What a worker process's small server holds: its broker and its metrics.
type WorkerState = web::Data<(
    crate::broker::Broker,
    std::sync::Arc<crate::metrics::Metrics>,
)>;

/// A health answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Status {
    /// `ok`.
    pub status: &'static str,
}

/// The running build.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Version {
    /// The cloudbrain version.
    pub version: &'static str,
}

/// Registered providers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProviderList {
    /// Names and types; never configuration.
    pub providers: Vec<ProviderSummary>,
}

/// Answers while the process is up.
#[utoipa::path(get, path = "/healthz", tag = "service", responses((status = 200, body = Status)))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Status { status: "ok" })
}

/// Answers 200 when the database is reachable, else 503.
#[utoipa::path(get, path = "/readyz", tag = "service", responses(
    (status = 200, body = Status),
    (status = 503, description = "Database unreachable", body = ErrorBody),
))]
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    ready(&state.broker).await
}

/// `/readyz` of a worker process: 200 when the database is reachable, else 503.
pub async fn worker_readyz(state: WorkerState) -> Result<HttpResponse, ApiError> {
    ready(&state.0).await
}

async fn ready(broker: &crate::broker::Broker) -> Result<HttpResponse, ApiError> {
    broker.ping().await?;
    Ok(HttpResponse::Ok().json(Status { status: "ok" }))
}

/// The running version.
#[utoipa::path(get, path = "/version", tag = "service", responses((status = 200, body = Version)))]
pub async fn version() -> HttpResponse {
    HttpResponse::Ok().json(Version {
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Registered providers' names and types.
#[utoipa::path(get, path = "/providers", tag = "providers",
    responses(
        (status = 200, body = ProviderList),
        TokenRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn list_providers(
    state: web::Data<AppState>,
    _caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let providers = state.broker.list_providers().await?;
    Ok(HttpResponse::Ok().json(ProviderList { providers }))
}

/// This API's OpenAPI 3.1 document, naming the registered providers and their types and
/// the longest lifetime a request may ask for.
#[utoipa::path(get, path = "/openapi.json", tag = "service", responses(
    (status = 200, description = "OpenAPI 3.1 document"),
    (status = 503, description = "Database unreachable", body = ErrorBody),
))]
pub async fn openapi(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let broker = &state.broker;
    let policies = broker.provider_policies().await?;
    let bound = |provider: &str| policies.get(provider).and_then(|p| p.max_lifetime_secs);
    let offered: Vec<ProviderShape> = broker
        .offered_instance_types()
        .await?
        .into_iter()
        .map(|(name, instance_types)| ProviderShape {
            most_ttl: Lifetime::most_seconds(Lifetime::longest(
                None,
                bound(&name),
                broker.max_lifetime(),
            )),
            name,
            instance_types,
        })
        .collect();
    let pools: Vec<PoolShape> = broker
        .pools()
        .await?
        .into_iter()
        .map(|status| PoolShape {
            most_ttl: Lifetime::most_seconds(Lifetime::longest(
                status
                    .pool
                    .max_lifetime_secs
                    .and_then(|s| u64::try_from(s).ok()),
                bound(&status.pool.provider_name),
                broker.max_lifetime(),
            )),
            name: status.pool.name,
            provider: status.pool.provider_name,
            image: status.pool.image,
            instance_type: status.pool.instance_type,
        })
        .collect();
    let broker_most = Lifetime::most_seconds(broker.max_lifetime());
    let document = super::openapi::document(&offered, &pools, broker_most)?;
    Ok(HttpResponse::Ok().json(document))
}

async fn render(
    broker: &crate::broker::Broker,
    metrics: &crate::metrics::Metrics,
    auth: Option<crate::auth::verifier::AuthStats>,
) -> Result<HttpResponse, ApiError> {
    let gauges = broker.gauges().await?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(metrics.render(&gauges, auth)))
}

/// Metrics in Prometheus' text format: instances by state and provider, queued and dead
/// jobs, dispatch latency, provider calls and errors, auth cache hits and misses.
#[utoipa::path(get, path = "/metrics", tag = "service", responses(
    (status = 200, description = "Prometheus text exposition format", content_type = "text/plain"),
    (status = 503, description = "Database unreachable", body = ErrorBody),
))]
pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    render(&state.broker, &state.metrics, Some(state.verifier.stats())).await
}

/// `/metrics` of a worker process.
pub async fn worker_metrics(state: WorkerState) -> Result<HttpResponse, ApiError> {
    render(&state.0, &state.1, None).await
}
