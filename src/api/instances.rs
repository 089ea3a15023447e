//! The instances routes: Cloud Brain's `POST/GET/DELETE /instances` and more.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use super::body::read_json;
use super::error::ApiError;
use super::openapi::{BodyRefusals, TokenRefusals};
use super::wire::{
    CreateInstanceBody, ErrorBody, EventBody, EventList, InstanceBody, InstanceList, ListParams,
};
use super::AppState;
use crate::auth::Caller;
use crate::broker::model::Instance;
use crate::broker::{CreateInstance, InstanceFilter, State};
use crate::ids::InstanceId;

/// The instance id in a path; one that is not an id names no instance (404, as for any
/// instance the caller cannot see).
fn instance_id(text: &str) -> Result<InstanceId, ApiError> {
    InstanceId::parse(text).ok_or_else(|| crate::broker::BrokerError::NotFound.into())
}

/// An instance as the answer to a request about it: 200, or 410 once it is terminated
/// (Cloud Brain's answer), the body the instance either way.
fn answer(instance: Instance) -> HttpResponse {
    let status = if instance.state == State::Terminated {
        actix_web::http::StatusCode::GONE
    } else {
        actix_web::http::StatusCode::OK
    };
    HttpResponse::build(status).json(InstanceBody::from(instance))
}

/// Asks for a machine.
#[utoipa::path(
    post, path = "/instances", tag = "instances",
    request_body = CreateInstanceBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely: the same key and body return the same instance")),
    responses(
        (status = 200, description = "Recorded; a create job is queued (200, not 201, as Cloud Brain answered and its clients expect)", body = InstanceBody,
         headers(("Location" = String, description = "/instances/<id>"))),
        (status = 409, description = "The Idempotency-Key was used with another body", body = ErrorBody),
        (status = 422, description = "A field breaks a rule", body = ErrorBody),
        (status = 429, description = "Too many failed attempts for this token", body = ErrorBody),
        TokenRefusals, BodyRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn create_instance(
    state: web::Data<AppState>,
    caller: Caller,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let idempotency_key = match req.headers().get("Idempotency-Key") {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_not_ascii| {
            ApiError::invalid("Idempotency-Key", "Idempotency-Key must be printable ASCII")
        })?),
    };
    let body: CreateInstanceBody = read_json(&req, payload, state.body_timeout).await?;
    let request = CreateInstance::from(body);
    let created = state
        .broker
        .create_instance(caller, request, idempotency_key)
        .await?;
    let body = InstanceBody::from(created.instance);
    // 200, not 201: Cloud Brain answered 200, and Travis CI's worker accepts nothing else.
    Ok(HttpResponse::Ok()
        .insert_header((header::LOCATION, format!("/instances/{}", body.id)))
        .json(body))
}

/// Reads one instance.
#[utoipa::path(
    get, path = "/instances/{id}", tag = "instances",
    params(("id" = String, Path, description = "Instance id")),
    responses(
        (status = 200, body = InstanceBody),
        (status = 404, description = "No such instance, or not the caller's", body = ErrorBody),
        (status = 410, description = "Terminated; the body is the instance", body = InstanceBody),
        TokenRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn get_instance(
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let instance = state.broker.get_instance(caller, instance_id(&id)?).await?;
    Ok(answer(instance))
}

/// Gives an instance back: it moves to `terminating` and its machine is destroyed.
#[utoipa::path(
    delete, path = "/instances/{id}", tag = "instances",
    params(("id" = String, Path, description = "Instance id")),
    responses(
        (status = 200, description = "Terminating (asking again changes nothing)", body = InstanceBody),
        (status = 404, body = ErrorBody),
        (status = 410, description = "Already terminated", body = InstanceBody),
        TokenRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn delete_instance(
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let instance = state
        .broker
        .delete_instance(caller, instance_id(&id)?)
        .await?;
    Ok(answer(instance))
}

/// Lists the caller's instances (every instance, for an admin token), newest first.
#[utoipa::path(
    get, path = "/instances", tag = "instances",
    params(ListParams),
    responses(
        (status = 200, body = InstanceList),
        (status = 400, body = ErrorBody),
        (status = 422, description = "Bad state, limit or cursor", body = ErrorBody),
        TokenRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn list_instances(
    state: web::Data<AppState>,
    caller: Caller,
    query: web::Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let limit = query
        .limit
        .map(|l| {
            l.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| l.parse::<i64>().ok())
                .flatten()
                .ok_or_else(|| {
                    ApiError::invalid("limit", "limit must be a whole number from 1 to 1000")
                })
        })
        .transpose()?;
    let page = state
        .broker
        .list_instances(
            caller,
            InstanceFilter {
                state: query.state,
                provider: query.provider,
                limit,
                cursor: query.cursor,
            },
        )
        .await?;
    Ok(HttpResponse::Ok().json(InstanceList {
        instances: page.instances.into_iter().map(InstanceBody::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// An instance's state timeline.
#[utoipa::path(
    get, path = "/instances/{id}/events", tag = "instances",
    params(("id" = String, Path, description = "Instance id")),
    responses(
        (status = 200, body = EventList),
        (status = 404, body = ErrorBody),
        TokenRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn instance_events(
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let events = state
        .broker
        .instance_events(caller, instance_id(&id)?)
        .await?;
    Ok(HttpResponse::Ok().json(EventList {
        events: events.into_iter().map(EventBody::from).collect(),
    }))
}
