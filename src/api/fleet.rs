//! The fleet routes (admin): read the stored provider configs and pools as one document,
//! and make them what a document says.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::body::read_body;
use super::error::ApiError;
use super::openapi::{AdminRefusals, BodyRefusals, TokenRefusals};
use super::wire::ErrorBody;
use super::AppState;
use crate::auth::Caller;
use crate::broker::fleet::{ApplyError, Fleet};

/// How `PUT /fleet` applies.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct ApplyParams {
    /// `true`: answer the plan, change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// `true`: also delete what the document does not name.
    #[serde(default)]
    pub prune: bool,
}

/// What `PUT /fleet` did.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FleetChanges {
    /// The changes, a line each, field by field (secrets named, never shown).
    pub changes: Vec<String>,
    /// Whether they were made (false for a dry run or no change).
    pub applied: bool,
}

impl From<ApplyError> for ApiError {
    fn from(error: ApplyError) -> Self {
        match error {
            ApplyError::Fleet(e) => ApiError::Unprocessable {
                field: Some(e.field.clone()),
                message: e.to_string(),
            },
            ApplyError::Broker(e) => e.into(),
        }
    }
}

fn wants_yaml(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("yaml"))
}

/// The stored fleet: JSON, or YAML when asked with `Accept: application/yaml`.
#[utoipa::path(
    get, path = "/fleet", tag = "fleet",
    responses(
        (status = 200, description = "Provider configs (secrets as references) and pools", content(
            (Fleet = "application/json"),
            (Fleet = "application/yaml"),
        )),
        TokenRefusals, AdminRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn get_fleet(
    state: web::Data<AppState>,
    caller: Caller,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let fleet = state.broker.fleet(caller).await?;
    if wants_yaml(&req) {
        let text = serde_norway::to_string(&fleet).map_err(|error| {
            tracing::error!(%error, "the fleet does not serialise as YAML");
            ApiError::Internal
        })?;
        return Ok(HttpResponse::Ok()
            .content_type("application/yaml")
            .body(text));
    }
    Ok(HttpResponse::Ok().json(fleet))
}

/// Makes the provider configs and pools what the document (YAML or JSON) says, in one
/// transaction. A `{"$env"}` or `{"$file"}` reference reads only as the value already
/// stored for it: the server reads no environment or file of its own.
#[utoipa::path(
    put, path = "/fleet", tag = "fleet",
    params(ApplyParams),
    request_body(description = "A fleet document, YAML or JSON", content(
        (Fleet = "application/yaml"),
        (Fleet = "application/json"),
    )),
    responses(
        (status = 200, body = FleetChanges),
        (status = 422, description = "The document is wrong; the field is a dotted path", body = ErrorBody),
        TokenRefusals, AdminRefusals, BodyRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn put_fleet(
    state: web::Data<AppState>,
    caller: Caller,
    req: HttpRequest,
    params: web::Query<ApplyParams>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    if let Some(value) = req.headers().get(header::CONTENT_TYPE) {
        let text = value.to_str().unwrap_or_default().to_ascii_lowercase();
        let essence = text.split(';').next().unwrap_or_default().trim().to_owned();
        let known = [
            "application/json",
            "application/yaml",
            "application/x-yaml",
            "text/yaml",
        ];
        if !known.contains(&essence.as_str()) && !essence.ends_with("+json") {
            return Err(ApiError::UnsupportedMediaType(
                text.chars().take(100).collect(),
            ));
        }
    }
    let body = read_body(&req, payload, state.body_timeout).await?;
    let text = std::str::from_utf8(&body)
        .map_err(|_not_utf8| ApiError::BadRequest("the document is not UTF-8".to_owned()))?;
    let plan = state
        .broker
        .put_fleet(caller, text, params.prune, params.dry_run)
        .await?;
    Ok(HttpResponse::Ok().json(FleetChanges {
        applied: !params.dry_run && !plan.is_empty(),
        changes: plan.lines(),
    }))
}
