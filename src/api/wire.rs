//! The API's wire types: every body a client sends or receives, as it is on the wire, and
//! how each is made from what the broker returns. Handlers and the error mapping use these;
//! nothing here knows about HTTP.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::broker::model::{Instance, InstanceEvent};
use crate::broker::State;

/// An instance as clients see it: Cloud Brain's fields, plus type and timestamps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceBody {
    /// The instance id.
    pub id: Uuid,
    /// The provider config's name.
    pub provider: String,
    /// The image it boots.
    pub image: String,
    /// The instance type.
    pub instance_type: String,
    /// Its address, once the cloud gives one.
    pub ip_address: Option<String>,
    /// The cloud's id of the machine.
    pub upstream_id: Option<String>,
    /// Why it is `errored`.
    pub error_reason: Option<String>,
    /// Where it is in its life.
    pub state: State,
    /// When it was asked for.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When its machine is destroyed whether or not it was given back; null: never.
    pub expires_at: Option<DateTime<Utc>>,
    /// Its machine's ECS container instance, for providers whose machines join a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecs: Option<EcsBody>,
}

/// How an instance's machine stands in its ECS cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EcsBody {
    /// The cluster's name.
    pub cluster: String,
    /// The container instance ARN, once registered.
    pub container_instance_arn: Option<String>,
    /// ECS's status of it (`ACTIVE`, `DRAINING`, …), once registered.
    pub status: Option<String>,
    /// Whether the ECS agent is connected.
    pub agent_connected: bool,
}

impl From<Instance> for InstanceBody {
    fn from(i: Instance) -> Self {
        Self {
            id: i.id.0,
            state: i.state,
            provider: i.provider_name,
            image: i.image,
            instance_type: i.instance_type,
            ip_address: i.ip_address,
            upstream_id: i.upstream_id,
            error_reason: i.error_reason,
            created_at: i.created_at,
            updated_at: i.updated_at,
            expires_at: i.expires_at,
            ecs: i
                .details
                .as_ref()
                .and_then(|d| d.get("ecs"))
                .and_then(|v| EcsBody::deserialize(v).ok()),
        }
    }
}

/// A request for a machine. Fields other than these are ignored.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateInstanceBody {
    /// The provider config's name (see `GET /providers`).
    pub provider: String,
    /// The image to boot (at most 255 characters, no control characters).
    pub image: String,
    /// One of the provider's instance types; absent, empty or `default` means the
    /// provider's default type.
    pub instance_type: Option<String>,
    /// One OpenSSH public key line to authorise on the machine; absent or empty means none.
    pub public_ssh_key: Option<String>,
    /// Seconds until the machine is destroyed whether or not it was given back; absent
    /// means the longest lifetime the broker gives (`expires_at` shows when).
    #[schema(minimum = 1)]
    pub ttl_seconds: Option<u64>,
}

impl CreateInstanceBody {
    /// Every field, by the name a client writes.
    pub const FIELDS: [&'static str; 5] = [
        "provider",
        "image",
        "instance_type",
        "public_ssh_key",
        "ttl_seconds",
    ];

    /// What `field` must hold, for a refusal of a value of another type.
    pub fn expected(field: &str) -> String {
        match field {
            "ttl_seconds" => format!(
                "ttl_seconds must be a whole number of seconds from 1 to {}",
                crate::broker::validate::MAX_TTL_SECONDS
            ),
            other => format!("{other} must be a string"),
        }
    }
}

impl From<CreateInstanceBody> for crate::broker::CreateInstance {
    fn from(body: CreateInstanceBody) -> Self {
        Self {
            provider: body.provider,
            image: body.image,
            instance_type: body.instance_type,
            public_ssh_key: body.public_ssh_key,
            ttl_seconds: body.ttl_seconds,
        }
    }
}

/// One page of instances.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceList {
    /// Newest first.
    pub instances: Vec<InstanceBody>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// One change of state.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventBody {
    /// The state left; null for the first.
    pub from_state: Option<State>,
    /// The state entered.
    pub to_state: State,
    /// Why, when there is more to say.
    pub reason: Option<String>,
    /// When.
    pub at: DateTime<Utc>,
}

/// An instance's timeline.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventList {
    /// Oldest first.
    pub events: Vec<EventBody>,
}

impl From<InstanceEvent> for EventBody {
    fn from(e: InstanceEvent) -> Self {
        Self {
            from_state: e.from_state,
            to_state: e.to_state,
            reason: e.reason,
            at: e.at,
        }
    }
}

/// Query of `GET /instances`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only instances in this state.
    pub state: Option<String>,
    /// Only instances on this provider.
    pub provider: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Cloud Brain's error envelope, with a machine-readable code beside it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Human-readable messages (Cloud Brain's field).
    pub errors: Vec<String>,
    /// A stable machine-readable code, e.g. `validation_failed`.
    pub code: &'static str,
    /// The request field at fault, for validation errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
}
