//! The HTTP API (actix-web): routes, handlers, the auth extractor and `ApiError`.
//!
//! Handlers only do HTTP: read the request, call the broker, write the answer.

pub mod auth;
pub mod body;
pub mod error;
pub mod fleet;
pub mod instances;
pub mod meta;
pub mod openapi;
pub mod pools;
pub mod stream;
pub mod tokens;
pub mod ui;
pub mod webhooks;
pub mod wire;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Server, Service, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, App, HttpServer};
use tracing::Instrument;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::auth::TokenVerifier;
use crate::broker::Broker;
use error::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The business rules.
    pub broker: Broker,
    /// Authenticates tokens.
    pub verifier: Arc<TokenVerifier>,
    /// How long a handler may run.
    pub request_timeout: Duration,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: crate::config::Networks,
    /// What this process has measured.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// This process's tail of the instance event stream.
    pub stream: Arc<crate::broker::stream::Hub>,
    /// The private networks a webhook may be registered to reach.
    pub webhook_networks: crate::config::Networks,
    /// When set, each worker thread of the server gets a pool of its own with these
    /// settings (`size` is the whole server's, shared out), for the requests it serves.
    /// A connection's I/O runs on the thread that opened it: with one pool for all
    /// threads, most queries would hop to another thread and back.
    pub worker_pools: Option<crate::db::PoolSettings>,
}

impl AppState {
    /// This state with the broker on a pool of its own of `settings`, for one of
    /// `workers` worker threads; as it is when that pool cannot be built.
    fn for_worker(&self, settings: &crate::db::PoolSettings, workers: usize) -> AppState {
        let settings = crate::db::PoolSettings {
            size: settings.size.div_ceil(workers).max(1),
            ..settings.clone()
        };
        let broker = match settings.build() {
            Ok(pool) => self.broker.clone().with_pool(pool),
            Err(error) => {
                tracing::warn!(%error, "a worker thread shares the process's pool");
                self.broker.clone()
            }
        };
        AppState {
            broker,
            worker_pools: None,
            ..self.clone()
        }
    }
}

/// The OpenAPI document of every route.
#[derive(OpenApi)]
#[openapi(
    info(title = "cloudbrain", description = "A multi-cloud instance broker, wire-compatible with Cloud Brain."),
    paths(
        instances::create_instance,
        instances::list_instances,
        instances::get_instance,
        instances::delete_instance,
        instances::instance_events,
        stream::stream_instances,
        fleet::get_fleet,
        fleet::put_fleet,
        pools::list_pools,
        pools::get_pool,
        pools::put_pool,
        pools::scale_pool,
        pools::delete_pool,
        webhooks::add_webhook,
        webhooks::list_webhooks,
        webhooks::delete_webhook,
        webhooks::list_deliveries,
        webhooks::redeliver,
        tokens::list_tokens,
        tokens::revoke_token,
        meta::list_providers,
        meta::healthz,
        meta::readyz,
        meta::version,
        meta::openapi,
        meta::metrics,
    ),
    components(schemas(wire::ErrorBody)),
    modifiers(&Security)
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Header(
                utoipa::openapi::security::ApiKeyValue::with_description(
                    "Authorization",
                    "`token <id>-<32 hex>`",
                ),
            )),
        );
        components.add_security_scheme(
            "basic",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Basic)),
        );
    }
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A request id sent by the client is echoed only when it is short and printable, so it
/// cannot forge log lines.
fn request_id(req: &ServiceRequest) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| crate::ids::random_uuid().to_string())
}

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".to_owned()))
}

/// The answer to any other method on a route that answers `allow`.
fn method_not_allowed(allow: &'static str) -> actix_web::Route {
    web::to(
        move || async move { Err::<actix_web::HttpResponse, _>(ApiError::MethodNotAllowed(allow)) },
    )
}

/// The actix application: every route, the request-id and timeout middleware, JSON errors.
pub fn app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let timeout = state.request_timeout;
    App::new()
        .app_data(state)
        .app_data(
            web::QueryConfig::default().error_handler(|err, _req| {
                ApiError::BadRequest(format!("query string: {err}")).into()
            }),
        )
        .app_data(
            web::PathConfig::default()
                .error_handler(|_err, _req| ApiError::NotFound("no such route".to_owned()).into()),
        )
        .wrap_fn(move |req, srv| {
            let id = request_id(&req);
            let sent_a_token = sends_token_scheme(&req);
            let span = tracing::info_span!(
                "request",
                request_id = %id,
                method = %req.method(),
                path = %req.path(),
            );
            let started = std::time::Instant::now();
            let call = srv.call(req);
            async move {
                let result = match tokio::time::timeout(timeout, call).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!(
                            timeout_ms = timeout.as_millis() as u64,
                            "request timed out"
                        );
                        return Err(ApiError::Unavailable("request timed out".to_owned()).into());
                    }
                };
                result.map(|mut response| {
                    tracing::info!(
                        status = response.status().as_u16(),
                        duration_ms = started.elapsed().as_millis() as u64,
                        "request finished"
                    );
                    if let Ok(value) = HeaderValue::from_str(&id) {
                        response.headers_mut().insert(REQUEST_ID.clone(), value);
                    }
                    if sent_a_token
                        && response.status() == actix_web::http::StatusCode::UNAUTHORIZED
                    {
                        // A Basic challenge would make a browser's fetch open a login
                        // dialog (and a headless one hang); the caller uses tokens.
                        response.headers_mut().insert(
                            actix_web::http::header::WWW_AUTHENTICATE,
                            HeaderValue::from_static("Token realm=\"cloudbrain\""),
                        );
                    }
                    response
                })
            }
            .instrument(span)
        })
        .service(
            web::resource("/instances")
                .route(web::post().to(instances::create_instance))
                .route(web::get().to(instances::list_instances))
                .default_service(method_not_allowed("GET, POST")),
        )
        .service(
            web::resource("/instances/{id}")
                .route(web::get().to(instances::get_instance))
                .route(web::delete().to(instances::delete_instance))
                .default_service(method_not_allowed("GET, DELETE")),
        )
        .service(
            web::resource("/instances/{id}/events")
                .route(web::get().to(instances::instance_events))
                .default_service(method_not_allowed("GET")),
        )
        .service(read_only("/stream/instances", stream::stream_instances))
        .service(
            web::resource("/fleet")
                .route(web::get().to(fleet::get_fleet))
                .route(web::put().to(fleet::put_fleet))
                .default_service(method_not_allowed("GET, PUT")),
        )
        .service(read_only("/pools", pools::list_pools))
        .service(
            web::resource("/pools/{name}")
                .route(web::get().to(pools::get_pool))
                .route(web::put().to(pools::put_pool))
                .route(web::delete().to(pools::delete_pool))
                .default_service(method_not_allowed("GET, PUT, DELETE")),
        )
        .service(
            web::resource("/pools/{name}/scale")
                .route(web::post().to(pools::scale_pool))
                .default_service(method_not_allowed("POST")),
        )
        .service(
            web::resource("/webhooks")
                .route(web::post().to(webhooks::add_webhook))
                .route(web::get().to(webhooks::list_webhooks))
                .default_service(method_not_allowed("GET, POST")),
        )
        .service(
            web::resource("/webhooks/{id}")
                .route(web::delete().to(webhooks::delete_webhook))
                .default_service(method_not_allowed("DELETE")),
        )
        .service(read_only(
            "/webhooks/{id}/deliveries",
            webhooks::list_deliveries,
        ))
        .service(
            web::resource("/webhooks/{id}/deliveries/{delivery}/redeliver")
                .route(web::post().to(webhooks::redeliver))
                .default_service(method_not_allowed("POST")),
        )
        .service(read_only("/tokens", tokens::list_tokens))
        .service(
            web::resource("/tokens/{id}")
                .route(web::delete().to(tokens::revoke_token))
                .default_service(method_not_allowed("DELETE")),
        )
        .service(read_only("/ui", ui::index))
        .service(read_only("/ui/", ui::index))
        .service(read_only("/ui/app.js", ui::script))
        .service(read_only("/ui/app.css", ui::style))
        .service(read_only("/providers", meta::list_providers))
        .service(read_only("/metrics", meta::metrics))
        .service(read_only("/healthz", meta::healthz))
        .service(read_only("/readyz", meta::readyz))
        .service(read_only("/version", meta::version))
        .service(read_only("/openapi.json", meta::openapi))
        .default_service(web::to(not_found))
}

/// Whether the request authenticates with `Authorization: token …` (not Basic).
fn sends_token_scheme(req: &ServiceRequest) -> bool {
    (req.headers().get(actix_web::http::header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_whitespace().next())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("token"))
}

/// A GET-only route that answers 405 JSON to every other method.
fn read_only<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    web::resource(path)
        .route(web::get().to(handler))
        .default_service(method_not_allowed("GET"))
}

/// Serves the API on `listener` until SIGTERM/SIGINT, then drains in-flight requests for
/// up to `shutdown_timeout`.
pub fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown_timeout: Duration,
) -> std::io::Result<Server> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let state = web::Data::new(state);
    let server = HttpServer::new(move || match &state.worker_pools {
        Some(settings) => app(web::Data::new(state.for_worker(settings, workers))),
        None => app(state.clone()),
    })
    .workers(workers)
    .client_request_timeout(Duration::from_secs(10))
    .client_disconnect_timeout(Duration::from_secs(5))
    .keep_alive(Duration::from_secs(75))
    .shutdown_timeout(shutdown_timeout.as_secs().max(1))
    .listen(listener)?
    .run();
    Ok(server)
}

/// Serves only `/metrics`, `/healthz` and `/readyz`, for worker processes.
pub fn serve_metrics(
    listener: TcpListener,
    broker: Broker,
    metrics: Arc<crate::metrics::Metrics>,
) -> std::io::Result<Server> {
    let state = web::Data::new((broker, metrics));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/metrics", web::get().to(meta::worker_metrics))
            .route("/healthz", web::get().to(meta::healthz))
            .route("/readyz", web::get().to(meta::worker_readyz))
            .default_service(web::to(not_found))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    Ok(server)
}
