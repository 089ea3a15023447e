//! The instances routes: Cloud Brain's `POST/GET/DELETE /instances` and more.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;

use super::error::ApiError;
use super::wire::{
    CreateInstanceBody, ErrorBody, EventBody, EventList, InstanceBody, InstanceList, ListParams,
};
use super::AppState;
use crate::auth::Caller;
use crate::broker::model::Instance;
use crate::broker::{CreateInstance, InstanceFilter, State};
use crate::ids::InstanceId;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

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

/// Refuses a body that says it is not JSON. No Content-Type at all is JSON: Travis CI's
/// worker sends none.
fn require_json(req: &HttpRequest) -> Result<(), ApiError> {
    let Some(value) = req.headers().get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or_default();
    let essence = text.split(';').next().unwrap_or_default().trim();
    let essence = essence.to_ascii_lowercase();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        return Ok(());
    }
    Err(ApiError::UnsupportedMediaType(
        text.chars().take(100).collect(),
    ))
}

/// Reads the body, refusing more than [`MAX_BODY_BYTES`] before reading it all, and a
/// body that has not arrived within `timeout` (a stalled upload is the client's fault).
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES));
    }
    let read = async {
        let mut body = Vec::new();
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_elapsed| ApiError::RequestTimeout(timeout.as_secs().max(1)))?
}

/// A JSON value read with duplicate object keys refused: `{"image": "a", "image": "b"}`
/// is ambiguous, and readers disagree on which one wins.
struct StrictJson(serde_json::Value);

impl<'de> Deserialize<'de> for StrictJson {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictJson)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictJson(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(serde_json::Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            let StrictJson(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(serde_json::Value::Object(object))
    }
}

/// Reads a create request through [`CreateInstanceBody`], the type the OpenAPI schema is
/// made from, so the two cannot drift. Unknown fields are ignored, as Cloud Brain did; a
/// field of the wrong type or a missing one is refused naming it.
fn parse_create(body: &[u8]) -> Result<CreateInstance, ApiError> {
    let StrictJson(value) = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::BadRequest(
            "request body must be a JSON object".to_owned(),
        ));
    }
    let parsed: CreateInstanceBody = serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let message = error.inner().to_string();
        let named =
            |name: &&str| path == *name || message.starts_with(&format!("missing field `{name}`"));
        match CreateInstanceBody::FIELDS.into_iter().find(named) {
            Some(field) if message.starts_with("invalid type: null") || path != field => {
                ApiError::invalid(field, format!("{field} is required"))
            }
            Some(field) => ApiError::invalid(field, CreateInstanceBody::expected(field)),
            None => ApiError::BadRequest(format!("request body: {message}")),
        }
    })?;
    Ok(parsed.into())
}

/// Asks for a machine.
#[utoipa::path(
    post, path = "/instances", tag = "instances",
    request_body = CreateInstanceBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely: the same key and body return the same instance")),
    responses(
        (status = 200, description = "Recorded; a create job is queued (200, not 201, as Cloud Brain answered and its clients expect)", body = InstanceBody,
         headers(("Location" = String, description = "/instances/<id>"))),
        (status = 400, description = "Malformed JSON, or a key given twice", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "A Content-Type other than JSON", body = ErrorBody),
        (status = 409, description = "The Idempotency-Key was used with another body", body = ErrorBody),
        (status = 422, description = "A field breaks a rule", body = ErrorBody),
        (status = 429, description = "Too many failed attempts for this token", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
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
    require_json(&req)?;
    let body = read_body(&req, payload, state.body_timeout).await?;
    let request = parse_create(&body)?;
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
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such instance, or not the caller's", body = ErrorBody),
        (status = 410, description = "Terminated; the body is the instance", body = InstanceBody),
        (status = 503, body = ErrorBody),
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
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 410, description = "Already terminated", body = InstanceBody),
        (status = 503, body = ErrorBody),
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
        (status = 401, body = ErrorBody),
        (status = 422, description = "Bad state, limit or cursor", body = ErrorBody),
        (status = 503, body = ErrorBody),
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
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
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
