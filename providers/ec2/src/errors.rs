//! EC2 and ECS errors mapped to the broker's typed kinds.
//!
//! The SDK's own retries are turned off (see `Ec2Provider::new`): the broker's job queue is
//! the one retry layer, with backoff and attempt counting, so a throttled call is not
//! retried three times inside a job that is then retried ten times.

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use cloudbrain_provider::ProviderError;

/// What an API error means for the broker, from its code and HTTP status.
pub fn classify(code: Option<&str>, status: Option<u16>, message: &str) -> ProviderError {
    let described = match code {
        Some(code) => format!("{code}: {message}"),
        None => message.to_owned(),
    };
    match code.unwrap_or_default() {
        "InvalidInstanceID.NotFound" | "InvalidInstanceID.Malformed" => ProviderError::NotFound,
        "RequestLimitExceeded"
        | "Throttling"
        | "ThrottlingException"
        | "TooManyRequestsException"
        | "RequestThrottled" => ProviderError::Throttled { retry_after: None },
        "InsufficientInstanceCapacity"
        | "InstanceLimitExceeded"
        | "VcpuLimitExceeded"
        | "InsufficientFreeAddressesInSubnet"
        | "InsufficientCapacity"
        | "MaxSpotInstanceCountExceeded" => ProviderError::Capacity(described),
        "UnauthorizedOperation"
        | "AuthFailure"
        | "AccessDenied"
        | "AccessDeniedException"
        | "OptInRequired"
        | "Blocked"
        | "MissingParameter"
        | "UnsupportedOperation"
        | "Unsupported"
        | "ClientException"
        | "ClusterNotFoundException" => ProviderError::Invalid(described),
        code if code.starts_with("Invalid") => ProviderError::Invalid(described),
        _ => match status {
            Some(429) => ProviderError::Throttled { retry_after: None },
            Some(400..=499) if code.is_some() => ProviderError::Invalid(described),
            _ => ProviderError::Transient(described),
        },
    }
}

/// Maps any SDK error: service errors by code, timeouts and connection failures as transient.
pub fn from_sdk<E, R>(err: SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HasStatus,
{
    let status = match &err {
        SdkError::ServiceError(ctx) => ctx.raw().status_code(),
        SdkError::ResponseError(ctx) => ctx.raw().status_code(),
        _ => None,
    };
    match &err {
        SdkError::TimeoutError(_) => ProviderError::Transient("EC2 API call timed out".to_owned()),
        SdkError::DispatchFailure(e) => {
            ProviderError::Transient(format!("EC2 API unreachable: {e:?}"))
        }
        _ => {
            let message = err.message().unwrap_or("no message").to_owned();
            classify(err.code(), status, &message)
        }
    }
}

/// The HTTP status of a raw response.
pub trait HasStatus {
    /// The status code, if there was a response.
    fn status_code(&self) -> Option<u16>;
}

impl HasStatus for aws_sdk_ec2::config::http::HttpResponse {
    fn status_code(&self) -> Option<u16> {
        Some(self.status().as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds() {
        let kind = |code: &str, status: u16| classify(Some(code), Some(status), "m");
        assert_eq!(
            kind("RequestLimitExceeded", 503),
            ProviderError::Throttled { retry_after: None }
        );
        assert_eq!(
            kind("Throttling", 400),
            ProviderError::Throttled { retry_after: None }
        );
        assert!(matches!(
            kind("InsufficientInstanceCapacity", 500),
            ProviderError::Capacity(_)
        ));
        assert!(matches!(
            kind("InstanceLimitExceeded", 400),
            ProviderError::Capacity(_)
        ));
        assert!(matches!(
            kind("VcpuLimitExceeded", 400),
            ProviderError::Capacity(_)
        ));
        assert!(matches!(
            kind("InvalidAMIID.NotFound", 400),
            ProviderError::Invalid(_)
        ));
        assert!(matches!(
            kind("InvalidParameterValue", 400),
            ProviderError::Invalid(_)
        ));
        assert!(matches!(
            kind("UnauthorizedOperation", 403),
            ProviderError::Invalid(_)
        ));
        assert_eq!(
            kind("InvalidInstanceID.NotFound", 400),
            ProviderError::NotFound
        );
        assert!(matches!(
            kind("InternalError", 500),
            ProviderError::Transient(_)
        ));
        assert!(matches!(
            kind("Unavailable", 503),
            ProviderError::Transient(_)
        ));
        assert!(matches!(
            classify(None, Some(502), "bad gateway"),
            ProviderError::Transient(_)
        ));
        assert!(matches!(
            classify(None, Some(429), "slow down"),
            ProviderError::Throttled { .. }
        ));
    }

    #[test]
    fn messages_keep_the_code() {
        let ProviderError::Invalid(message) = classify(
            Some("InvalidAMIID.NotFound"),
            Some(400),
            "The image id '[ami-1]' does not exist",
        ) else {
            panic!("not invalid");
        };
        assert_eq!(
            message,
            "InvalidAMIID.NotFound: The image id '[ami-1]' does not exist"
        );
    }
}
