//! `ApiError`: the one HTTP error type, and Cloud Brain's error envelope `{"errors": […]}`.

use std::time::Duration;

use super::wire::ErrorBody;
use crate::auth::AuthError;
use crate::broker::BrokerError;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

/// Seconds a client is told to wait after a 503: long enough for a pool to reconnect.
pub const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 2;

/// How long a client is told to wait when a pool is full.
pub const POOL_FULL_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Everything a request can fail with, mapped to a status and a JSON body.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body or query could not be read (400).
    #[error("{0}")]
    BadRequest(String),
    /// Missing, malformed, unknown, wrong or revoked token: all alike (401).
    #[error("authentication required: send `Authorization: token <id>-<secret>`, or HTTP Basic with user \"token\" and the token as password")]
    Unauthorized,
    /// The token may not do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such resource, or none the caller may see (404).
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method; the methods it has (405).
    #[error("method not allowed; this route answers {0}")]
    MethodNotAllowed(&'static str),
    /// The body did not arrive in time (408).
    #[error("the request body did not arrive within {0} s")]
    RequestTimeout(u64),
    /// The body is over the limit (413).
    #[error("request body must be at most {0} bytes")]
    PayloadTooLarge(usize),
    /// The body is not JSON by its Content-Type (415).
    #[error("Content-Type must be application/json (or absent), not {0:?}")]
    UnsupportedMediaType(String),
    /// The request conflicts with an earlier one; `field` names what they share (409).
    #[error("{message}")]
    Conflict {
        /// What the two requests share.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The request breaks a rule; `field` names the culprit (422).
    #[error("{message}")]
    Unprocessable {
        /// The field at fault (a dotted path in a document).
        field: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// Too many failed attempts (429).
    #[error("{message}")]
    TooManyRequests {
        /// What to do.
        message: String,
        /// When to come back.
        retry_after: Duration,
    },
    /// A dependency is down or the request ran out of time (503).
    #[error("{0}")]
    Unavailable(String),
    /// A fault of ours; details are logged, never sent (500).
    #[error("internal server error")]
    Internal,
}

impl ApiError {
    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Conflict { .. } => "conflict",
            ApiError::Unprocessable { .. } => "validation_failed",
            ApiError::TooManyRequests { .. } => "too_many_requests",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal => "internal",
        }
    }

    /// A validation error naming `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ApiError::Unprocessable {
            field: Some(field.to_owned()),
            message: message.into(),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unauthorized => {
                response.insert_header((
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"cloudbrain\""),
                ));
            }
            ApiError::TooManyRequests { retry_after, .. } => {
                response.insert_header((header::RETRY_AFTER, retry_after.as_secs().max(1)));
            }
            ApiError::Unavailable(_) => {
                response.insert_header((header::RETRY_AFTER, UNAVAILABLE_RETRY_AFTER_SECS));
            }
            ApiError::MethodNotAllowed(allow) => {
                response.insert_header((header::ALLOW, *allow));
            }
            ApiError::RequestTimeout(_) => {
                // The rest of a stalled body is not worth waiting for.
                response.insert_header((header::CONNECTION, "close"));
            }
            _ => {}
        }
        let field = match self {
            ApiError::Unprocessable { field, .. } => field.clone(),
            ApiError::Conflict { field, .. } => Some((*field).to_owned()),
            _ => None,
        };
        response.json(ErrorBody {
            errors: vec![self.to_string()],
            code: self.code(),
            field,
        })
    }
}

impl From<BrokerError> for ApiError {
    fn from(err: BrokerError) -> Self {
        match err {
            BrokerError::Invalid { field, message } => ApiError::Unprocessable {
                field: Some(field.to_owned()),
                message,
            },
            BrokerError::IdempotencyConflict => ApiError::Conflict {
                field: "Idempotency-Key",
                message: err.to_string(),
            },
            BrokerError::NotFound => ApiError::NotFound("instance not found".to_owned()),
            BrokerError::NoSuchPool(_)
            | BrokerError::NoSuchWebhook(_)
            | BrokerError::NoSuchToken(_) => ApiError::NotFound(err.to_string()),
            BrokerError::PoolFull { .. } => ApiError::TooManyRequests {
                message: err.to_string(),
                retry_after: POOL_FULL_RETRY_AFTER,
            },
            BrokerError::Forbidden(message) => ApiError::Forbidden(message),
            BrokerError::Unavailable => {
                ApiError::Unavailable("database unavailable, try again shortly".to_owned())
            }
            BrokerError::NotMigrated(_) => ApiError::Unavailable(err.to_string()),
            BrokerError::Internal(error) => {
                tracing::error!(error = format!("{error:#}"), "internal error");
                ApiError::Internal
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Rejected => ApiError::Unauthorized,
            AuthError::Throttled { retry_after } => ApiError::TooManyRequests {
                message: format!(
                    "too many failed attempts from this address; retry in {} s",
                    retry_after.as_secs().max(1)
                ),
                retry_after,
            },
            AuthError::Busy { .. } => ApiError::Unavailable(
                "too many token verifications at once, try again shortly".to_owned(),
            ),
            AuthError::Unavailable => {
                ApiError::Unavailable("token store unavailable, try again shortly".to_owned())
            }
        }
    }
}
