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
    /// Where its machine was made (a zone of its provider config), when it has a choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
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
    /// Tasks running on it.
    #[serde(default)]
    pub running_tasks: i32,
    /// Tasks placed on it and not started yet.
    #[serde(default)]
    pub pending_tasks: i32,
}

impl EcsBody {
    /// The `ecs` detail a provider keeps with an instance, if it has one.
    fn of(details: Option<&serde_json::Value>) -> Option<Self> {
        details
            .and_then(|d| d.get("ecs"))
            .and_then(|v| Self::deserialize(v).ok())
    }
}

/// One machine of a pool that is an ECS district, as a container instance of its cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ContainerInstanceBody {
    /// The instance.
    pub instance_id: uuid::Uuid,
    /// The instance's state.
    pub state: State,
    /// Whether a client holds it.
    pub assigned: bool,
    /// How it stands in the cluster.
    #[serde(flatten)]
    pub ecs: EcsBody,
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
            placement: i.placement,
            ecs: EcsBody::of(i.details.as_ref()),
        }
    }
}

/// A request for a machine. Fields other than these are ignored.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateInstanceBody {
    /// A pool to take an idle machine from (or to make one for); its shape stands for
    /// `provider`, `image` and `instance_type`.
    pub pool: Option<String>,
    /// The provider config's name (see `GET /providers`); required without `pool`.
    pub provider: Option<String>,
    /// The image to boot (at most 255 characters, no control characters); required
    /// without `pool`.
    pub image: Option<String>,
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

/// A body a request sends, read by `api::body::read_json`.
pub trait RequestBody: serde::de::DeserializeOwned {
    /// Every field, by the name a client writes.
    const FIELDS: &'static [&'static str];

    /// What `field` must hold, for a refusal of a value of another type.
    fn expected(field: &str) -> String;
}

impl RequestBody for CreateInstanceBody {
    const FIELDS: &'static [&'static str] = &[
        "pool",
        "provider",
        "image",
        "instance_type",
        "public_ssh_key",
        "ttl_seconds",
    ];

    fn expected(field: &str) -> String {
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
            pool: body.pool,
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

/// One event of `GET /stream/instances` (the `data` of an SSE `instance` event; its SSE
/// `id` is its position in the stream).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamEventBody {
    /// The change.
    pub event: EventBody,
    /// The instance as it is when the event is read.
    pub instance: InstanceBody,
}

/// Why the server ended a stream (the `data` of an SSE `closed` event).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamClosedBody {
    /// What happened and what to do.
    pub reason: String,
}

/// The filters of `GET /stream/instances`; each one set must match.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// Only instances on this provider config.
    pub provider: Option<String>,
    /// Only instances of this pool.
    pub pool: Option<String>,
    /// Only events entering this state.
    pub state: Option<String>,
    /// Only this instance's events.
    pub instance: Option<String>,
}

impl From<StreamParams> for crate::broker::stream::StreamQuery {
    fn from(p: StreamParams) -> Self {
        Self {
            provider: p.provider,
            pool: p.pool,
            state: p.state,
            instance: p.instance,
        }
    }
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
    /// The request field at fault, for validation errors (a dotted path in a document).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A pool's shape and size, as `PUT /pools/<name>` sends it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PoolSpecBody {
    /// The provider config its machines run on.
    pub provider: String,
    /// The image they boot.
    pub image: String,
    /// One of the provider's instance types; absent, empty or `default` is its default.
    pub instance_type: Option<String>,
    /// Machines kept booted and unassigned (default 0).
    #[serde(default)]
    pub min_idle: u32,
    /// Most live instances of the pool, idle, busy and booting.
    #[schema(minimum = 1)]
    pub max_size: u32,
    /// The longest one of its machines lives, in seconds; absent: the broker's longest.
    #[schema(minimum = 1)]
    pub max_lifetime_secs: Option<u64>,
    /// Offerings to fall back to, in order, when the pool's own shape has no room: each
    /// another instance type, another provider config, or both.
    #[serde(default)]
    pub fallbacks: Vec<crate::broker::offerings::Fallback>,
}

impl RequestBody for PoolSpecBody {
    const FIELDS: &'static [&'static str] = &[
        "provider",
        "image",
        "instance_type",
        "min_idle",
        "max_size",
        "max_lifetime_secs",
        "fallbacks",
    ];

    fn expected(field: &str) -> String {
        match field {
            "provider" | "image" | "instance_type" => format!("{field} must be a string"),
            "fallbacks" => {
                "fallbacks must be a list of {\"provider\", \"instance_type\"} objects".to_owned()
            }
            other => format!("{other} must be a whole number"),
        }
    }
}

impl From<PoolSpecBody> for crate::broker::pools::PoolSpec {
    fn from(body: PoolSpecBody) -> Self {
        Self {
            provider: body.provider,
            image: body.image,
            instance_type: body.instance_type,
            min_idle: body.min_idle,
            max_size: body.max_size,
            max_lifetime_secs: body.max_lifetime_secs,
            fallbacks: body.fallbacks,
        }
    }
}

/// `POST /pools/<name>/scale`: how many idle machines to keep.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ScaleBody {
    /// Machines kept booted and unassigned, at most the pool's `max_size`.
    pub min_idle: u32,
}

impl RequestBody for ScaleBody {
    const FIELDS: &'static [&'static str] = &["min_idle"];

    fn expected(field: &str) -> String {
        format!("{field} must be a whole number")
    }
}

/// How a pool's live instances stand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolCountsBody {
    /// Running and unassigned: what a request can take at once.
    pub idle: u32,
    /// Assigned to a client and not yet given back.
    pub busy: u32,
    /// Unassigned and still booting.
    pub starting: u32,
    /// Errored, their machines being cleaned up.
    pub errored: u32,
    /// Being destroyed: given back, expired or scaled in.
    pub expiring: u32,
}

/// A pool as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolBody {
    /// Its name, what a request puts in `pool`.
    pub name: String,
    /// The provider config its machines run on.
    pub provider: String,
    /// The image they boot.
    pub image: String,
    /// Their instance type.
    pub instance_type: String,
    /// Machines kept booted and unassigned.
    pub min_idle: u32,
    /// Most live instances of the pool.
    pub max_size: u32,
    /// The longest one of its machines lives, in seconds; null: the broker's longest.
    pub max_lifetime_secs: Option<u64>,
    /// The offerings it falls back to, in order, when its own shape has no room.
    pub fallbacks: Vec<crate::broker::offerings::Fallback>,
    /// How its instances stand.
    pub counts: PoolCountsBody,
    /// The reasons of its latest errored instances, newest first.
    pub last_errors: Vec<String>,
    /// For a pool on an EC2 config with `ecs_cluster` (an ECS district): its machines as
    /// container instances of the cluster; absent otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_instances: Vec<ContainerInstanceBody>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When its shape or size last changed.
    pub updated_at: DateTime<Utc>,
}

impl From<crate::broker::pools::PoolStatus> for PoolBody {
    fn from(status: crate::broker::pools::PoolStatus) -> Self {
        let (pool, c) = (status.pool, status.counts);
        Self {
            name: pool.name,
            provider: pool.provider_name,
            image: pool.image,
            instance_type: pool.instance_type,
            min_idle: u32::try_from(pool.min_idle).unwrap_or_default(),
            max_size: u32::try_from(pool.max_size).unwrap_or_default(),
            max_lifetime_secs: pool.max_lifetime_secs.and_then(|s| u64::try_from(s).ok()),
            fallbacks: crate::broker::offerings::fallbacks_of(&pool.fallbacks),
            counts: PoolCountsBody {
                idle: c.idle,
                busy: c.busy,
                starting: c.starting,
                errored: c.errored,
                expiring: c.expiring,
            },
            last_errors: status.last_errors,
            container_instances: status
                .machines
                .iter()
                .filter_map(|m| {
                    Some(ContainerInstanceBody {
                        instance_id: m.id.0,
                        state: m.state,
                        assigned: m.assigned,
                        ecs: EcsBody::of(m.details.as_ref())?,
                    })
                })
                .collect(),
            created_at: pool.created_at,
            updated_at: pool.updated_at,
        }
    }
}

/// Every pool.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolList {
    /// By name.
    pub pools: Vec<PoolBody>,
}

/// `POST /webhooks`: a subscription to instance events.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewWebhookBody {
    /// `webhook` (signed JSON, the default) or `slack` (a message to a Slack incoming
    /// webhook).
    pub kind: Option<String>,
    /// Where deliveries are POSTed: http or https, to a public address unless the server
    /// allows a private network.
    pub url: String,
    /// The secret deliveries are signed with (webhooks; at least 16 characters); never
    /// shown again.
    pub secret: Option<String>,
    /// The states whose events are sent; absent or empty: every event.
    #[serde(default)]
    pub events: Vec<String>,
    /// Which instances' events; every field set must match.
    #[serde(default)]
    pub filter: WebhookFilterBody,
}

/// Which instances a subscription hears of.
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookFilterBody {
    /// Only instances on this provider config.
    pub provider: Option<String>,
    /// Only instances of this pool.
    pub pool: Option<String>,
    /// Only this instance.
    pub instance: Option<String>,
}

impl RequestBody for NewWebhookBody {
    const FIELDS: &'static [&'static str] = &["kind", "url", "secret", "events", "filter"];

    fn expected(field: &str) -> String {
        match field {
            "events" => "events must be a list of state names".to_owned(),
            "filter" => "filter must be an object of provider, pool and instance".to_owned(),
            other => format!("{other} must be a string"),
        }
    }
}

impl From<NewWebhookBody> for crate::broker::webhooks::NewWebhook {
    fn from(body: NewWebhookBody) -> Self {
        Self {
            kind: body.kind,
            url: body.url,
            secret: body.secret,
            events: body.events,
            provider: body.filter.provider,
            pool: body.filter.pool,
            instance: body.filter.instance,
        }
    }
}

/// A subscription (its secret never shown; a Slack URL, which is a secret, only up to
/// its host).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookBody {
    /// Its id.
    pub id: i64,
    /// `webhook` or `slack`.
    pub kind: String,
    /// Where deliveries go.
    pub url: String,
    /// The states whose events are sent; empty: all.
    pub events: Vec<String>,
    /// Which instances' events.
    pub filter: WebhookFilterBody,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
}

impl From<crate::broker::webhooks::Webhook> for WebhookBody {
    fn from(w: crate::broker::webhooks::Webhook) -> Self {
        use crate::broker::webhooks::WebhookKind;
        let url = match w.kind {
            WebhookKind::Webhook => w.url,
            WebhookKind::Slack => url::Url::parse(&w.url)
                .map(|u| format!("{}://{}/…", u.scheme(), u.host_str().unwrap_or_default()))
                .unwrap_or_else(|_| "…".to_owned()),
        };
        Self {
            id: w.id,
            kind: w.kind.as_str().to_owned(),
            url,
            events: w.events.into_iter().flatten().collect(),
            filter: WebhookFilterBody {
                provider: w.provider,
                pool: w.pool,
                instance: w.instance_id.map(|id| id.to_string()),
            },
            created_at: w.created_at,
        }
    }
}

/// `GET /webhooks`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookList {
    /// Oldest first.
    pub webhooks: Vec<WebhookBody>,
}

/// One delivery of an event to a subscription.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryBody {
    /// Its id (the `Cloudbrain-Delivery` header and the body's `delivery`).
    pub id: i64,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    /// The event it reports.
    pub event: EventBody,
    /// Attempts made.
    pub attempts: i32,
    /// The receiver's last status code.
    pub last_status: Option<i32>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When it is tried again, while pending.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the receiver took it.
    pub delivered_at: Option<DateTime<Utc>>,
}

impl From<(crate::broker::webhooks::Delivery, InstanceEvent)> for DeliveryBody {
    fn from((d, event): (crate::broker::webhooks::Delivery, InstanceEvent)) -> Self {
        use crate::broker::webhooks::DeliveryStatus;
        Self {
            id: d.id,
            status: d.status.as_str().to_owned(),
            event: EventBody::from(event),
            attempts: d.attempts,
            last_status: d.last_status,
            last_error: d.last_error,
            next_attempt_at: (d.status == DeliveryStatus::Pending).then_some(d.next_attempt_at),
            delivered_at: d.delivered_at,
        }
    }
}

/// `GET /webhooks/<id>/deliveries`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryList {
    /// Newest first.
    pub deliveries: Vec<DeliveryBody>,
}

/// A token as admins see it: never its secret, salt or hash.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenBody {
    /// The `<id>` part of the token.
    pub id: i32,
    /// What it is for.
    pub description: String,
    /// `client` or `admin`.
    #[schema(pattern = "^(client|admin)$")]
    pub scope: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it last authenticated a request (to the minute).
    pub last_used_at: Option<DateTime<Utc>>,
    /// When it was revoked; a revoked token is refused everywhere.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<crate::auth::store::TokenSummary> for TokenBody {
    fn from(t: crate::auth::store::TokenSummary) -> Self {
        Self {
            id: t.id,
            description: t.description,
            scope: t.scope,
            created_at: t.created_at,
            last_used_at: t.last_used_at,
            revoked_at: t.revoked_at,
        }
    }
}

/// `GET /tokens`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenList {
    /// Oldest first.
    pub tokens: Vec<TokenBody>,
}
