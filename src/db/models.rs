//! Rows of the broker's tables, as diesel reads and writes them.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::schema::{auth_tokens, instance_events, instances, jobs, providers};

/// A row of `auth_tokens`.
#[derive(Debug, Clone, Queryable, Selectable, Identifiable)]
#[diesel(table_name = auth_tokens, check_for_backend(diesel::pg::Pg))]
pub struct AuthToken {
    /// The `<id>` part of a token.
    pub id: i32,
    /// What the operator said the token is for.
    pub description: String,
    /// The 32-byte scrypt salt.
    pub token_salt: Vec<u8>,
    /// scrypt of the 16 secret bytes.
    pub token_hash: Vec<u8>,
    /// What the token may do.
    pub scope: crate::auth::Scope,
    /// When the token was made.
    pub created_at: DateTime<Utc>,
    /// When the token last authenticated a request (to the minute).
    pub last_used_at: Option<DateTime<Utc>>,
    /// When the token was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A new row of `auth_tokens`.
#[derive(Debug, Insertable)]
#[diesel(table_name = auth_tokens)]
pub struct NewAuthToken<'a> {
    /// What the operator said the token is for.
    pub description: &'a str,
    /// The 32-byte scrypt salt.
    pub token_salt: &'a [u8],
    /// scrypt of the 16 secret bytes.
    pub token_hash: &'a [u8],
    /// What the token may do.
    pub scope: crate::auth::Scope,
}

/// A row of `providers`.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = providers, check_for_backend(diesel::pg::Pg))]
pub struct ProviderRow {
    /// Row id.
    pub id: Uuid,
    /// The name clients put in `provider`.
    pub name: String,
    /// The kind of cloud, as the provider catalog names it (`fake`, `ec2`, `gce`).
    #[diesel(column_name = type_)]
    pub kind: String,
    /// The config JSON, sealed with secretbox.
    pub config: Vec<u8>,
    /// When the provider was registered.
    pub created_at: DateTime<Utc>,
    /// What the config offers, readable without the key (`None`: not recorded yet).
    pub offer: Option<serde_json::Value>,
}

/// A new row of `providers`.
#[derive(Debug, Insertable)]
#[diesel(table_name = providers)]
pub struct NewProvider<'a> {
    /// The name clients put in `provider`.
    pub name: &'a str,
    /// The kind of cloud, as the provider catalog names it (`fake`, `ec2`, `gce`).
    #[diesel(column_name = type_)]
    pub kind: &'a str,
    /// The config JSON, sealed with secretbox.
    pub config: &'a [u8],
    /// What the config offers, readable without the key.
    pub offer: &'a serde_json::Value,
}

/// A row of `instances`.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Identifiable)]
#[diesel(table_name = instances, check_for_backend(diesel::pg::Pg))]
pub struct Instance {
    /// The instance id clients use.
    pub id: Uuid,
    /// The token that asked for it.
    pub owner_token_id: i32,
    /// The provider config it runs on.
    pub provider_name: String,
    /// The image it boots.
    pub image: String,
    /// The broker's instance type name.
    pub instance_type: String,
    /// The OpenSSH public key to authorise on it.
    pub public_ssh_key: Option<String>,
    /// Where it is in its life.
    pub state: crate::broker::State,
    /// Its address, once the cloud gives one.
    pub ip_address: Option<String>,
    /// The cloud's id of the machine.
    pub upstream_id: Option<String>,
    /// Why it is `errored`.
    pub error_reason: Option<String>,
    /// The client's `Idempotency-Key`, if it sent one.
    pub idempotency_key: Option<String>,
    /// When it was asked for.
    pub created_at: DateTime<Utc>,
    /// When its row last changed.
    pub updated_at: DateTime<Utc>,
    /// When it reached `terminated`.
    pub terminated_at: Option<DateTime<Utc>>,
    /// What ECS says of its machine, when its provider joins a cluster.
    pub ecs: Option<serde_json::Value>,
}

/// A new row of `instances`.
#[derive(Debug, Insertable)]
#[diesel(table_name = instances)]
pub struct NewInstance<'a> {
    /// The instance id clients use.
    pub id: Uuid,
    /// The token that asked for it.
    pub owner_token_id: i32,
    /// The provider config it runs on.
    pub provider_name: &'a str,
    /// The image it boots.
    pub image: &'a str,
    /// The broker's instance type name.
    pub instance_type: &'a str,
    /// The OpenSSH public key to authorise on it.
    pub public_ssh_key: Option<&'a str>,
    /// Its first state.
    pub state: crate::broker::State,
    /// The client's `Idempotency-Key`, if it sent one.
    pub idempotency_key: Option<&'a str>,
}

/// A change to an instance row made together with a state transition.
#[derive(Debug, Default, AsChangeset)]
#[diesel(table_name = instances)]
pub struct InstanceChange<'a> {
    /// The cloud's id of the machine, when newly known.
    pub upstream_id: Option<&'a str>,
    /// The machine's address, when newly known.
    pub ip_address: Option<&'a str>,
    /// Why the instance errored.
    pub error_reason: Option<&'a str>,
    /// What ECS newly says of its machine.
    pub ecs: Option<&'a serde_json::Value>,
}

/// A row of `instance_events`.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = instance_events, check_for_backend(diesel::pg::Pg))]
pub struct InstanceEvent {
    /// Row id; orders events of one instance.
    pub id: i64,
    /// The instance that changed.
    pub instance_id: Uuid,
    /// The state it left (none for its first state).
    pub from_state: Option<crate::broker::State>,
    /// The state it entered.
    pub to_state: crate::broker::State,
    /// Why, when there is more to say than the states.
    pub reason: Option<String>,
    /// When.
    pub at: DateTime<Utc>,
}

/// A new row of `instance_events`.
#[derive(Debug, Insertable)]
#[diesel(table_name = instance_events)]
pub struct NewInstanceEvent<'a> {
    /// The instance that changed.
    pub instance_id: Uuid,
    /// The state it left.
    pub from_state: Option<crate::broker::State>,
    /// The state it entered.
    pub to_state: crate::broker::State,
    /// Why.
    pub reason: Option<&'a str>,
}

/// A row of `jobs`.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = jobs, check_for_backend(diesel::pg::Pg))]
pub struct Job {
    /// Row id.
    pub id: i64,
    /// What it does.
    pub kind: crate::queue::JobKind,
    /// The instance the job works on.
    pub instance_id: Uuid,
    /// Where it is.
    pub status: crate::queue::JobStatus,
    /// How many times a worker has tried it.
    pub attempts: i32,
    /// Not before this time.
    pub run_at: DateTime<Utc>,
    /// The worker holding its lease.
    pub locked_by: Option<String>,
    /// When that lease runs out.
    pub locked_until: Option<DateTime<Utc>>,
    /// What went wrong last time.
    pub last_error: Option<String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
}

/// A new row of `jobs`.
#[derive(Debug, Insertable)]
#[diesel(table_name = jobs)]
pub struct NewJob {
    /// What it does.
    pub kind: crate::queue::JobKind,
    /// The instance the job works on.
    pub instance_id: Uuid,
}
