//! Request bodies: JSON only (or no Content-Type, as Travis CI's worker sends), at most
//! [`MAX_BODY_BYTES`], arriving in time, duplicate keys refused, read through the typed
//! body the OpenAPI schema is made from, a wrong or missing field refused by name.

use actix_web::http::header;
use actix_web::{web, HttpRequest};
use futures_util::StreamExt;

use super::error::ApiError;
use super::wire::RequestBody;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

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
pub(super) async fn read_body(
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

/// Reads a request body of type `T`: a JSON body (by its Content-Type, or none), in time
/// and within [`MAX_BODY_BYTES`], parsed by [`parse`].
pub async fn read_json<T: RequestBody>(
    req: &HttpRequest,
    payload: web::Payload,
    timeout: std::time::Duration,
) -> Result<T, ApiError> {
    require_json(req)?;
    let body = read_body(req, payload, timeout).await?;
    parse(&body)
}

/// Reads a request through `T`, the type the OpenAPI schema is made from, so the two
/// cannot drift. Unknown fields are ignored, as Cloud Brain did; a field of the wrong
/// type or a missing one is refused naming it.
fn parse<T: RequestBody>(body: &[u8]) -> Result<T, ApiError> {
    let value = crate::json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::BadRequest(
            "request body must be a JSON object".to_owned(),
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let message = error.inner().to_string();
        // A field's own value, or one inside it (`fallbacks[0].provider`).
        let within = |name: &str| {
            path.strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['[', '.']))
        };
        let missing = |name: &str| message.starts_with(&format!("missing field `{name}`"));
        let named = |name: &&str| within(name) || missing(name);
        match T::FIELDS.iter().copied().find(named) {
            Some(field) if path == field && message.starts_with("invalid type: null") => {
                ApiError::invalid(field, format!("{field} is required"))
            }
            Some(field) if within(field) => ApiError::invalid(field, T::expected(field)),
            Some(field) => ApiError::invalid(field, format!("{field} is required")),
            None => ApiError::BadRequest(format!("request body: {message}")),
        }
    })
}
