//! The broker's rows: instances, their events and provider configs, as diesel reads and
//! writes them. These are the domain's own types; the API answers with them.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::State;
use crate::db::schema::{instance_events, instances, pools, providers};
use crate::ids::{InstanceId, TokenId};

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
    /// When the config last changed; workers rebuild their live provider when it moves.
    pub updated_at: DateTime<Utc>,
    /// Where its secrets came from, by dotted field path, when a fleet file named them.
    pub secret_refs: Option<serde_json::Value>,
    /// The longest an instance on it lives, in seconds (`None`: the broker's longest).
    pub max_lifetime_secs: Option<i64>,
    /// The offerings its instances fall back to ([`crate::broker::offerings::Fallback`]s).
    pub fallbacks: serde_json::Value,
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
#[derive(Debug, Clone, PartialEq, Queryable, QueryableByName, Selectable, Identifiable)]
#[diesel(table_name = instances, check_for_backend(diesel::pg::Pg))]
pub struct Instance {
    /// The instance id clients use.
    pub id: InstanceId,
    /// The token that asked for it, or took it from a pool (`None`: an idle pool machine).
    pub owner_token_id: Option<TokenId>,
    /// The provider config it runs on.
    pub provider_name: String,
    /// The image it boots.
    pub image: String,
    /// The broker's instance type name.
    pub instance_type: String,
    /// The OpenSSH public key to authorise on it.
    pub public_ssh_key: Option<String>,
    /// Where it is in its life.
    pub state: State,
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
    /// What its provider says of the machine beyond the contract, by name (`ecs`, …).
    pub details: Option<serde_json::Value>,
    /// When its machine is destroyed whether or not it was given back (`None`: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// The pool it was made for, if any.
    pub pool_name: Option<String>,
    /// When a request took it from its pool.
    pub assigned_at: Option<DateTime<Utc>>,
    /// Where its machine is made (a zone of its provider config); `None`: the provider's
    /// own choice.
    pub placement: Option<String>,
    /// The provider and instance type it was asked for, once a capacity fallback moved
    /// it elsewhere (`{"provider", "instance_type"}`).
    pub asked: Option<serde_json::Value>,
    /// Since when it waits for its key to be put on its warm machine.
    pub key_pending_since: Option<DateTime<Utc>>,
}

/// A new row of `instances`.
#[derive(Debug, Insertable)]
#[diesel(table_name = instances)]
pub struct NewInstance<'a> {
    /// The instance id clients use.
    pub id: InstanceId,
    /// The token that asked for it, or took it from a pool (`None`: an idle pool machine).
    pub owner_token_id: Option<TokenId>,
    /// The provider config it runs on.
    pub provider_name: &'a str,
    /// The image it boots.
    pub image: &'a str,
    /// The broker's instance type name.
    pub instance_type: &'a str,
    /// The OpenSSH public key to authorise on it.
    pub public_ssh_key: Option<&'a str>,
    /// Its first state.
    pub state: State,
    /// The client's `Idempotency-Key`, if it sent one.
    pub idempotency_key: Option<&'a str>,
    /// The pool it is made for, if any.
    pub pool_name: Option<&'a str>,
}

/// A change to an instance row made together with a state transition
/// ([`super::state::transition`]); a field left `None` keeps the row's value.
#[derive(Debug, Default)]
pub struct InstanceChange<'a> {
    /// The cloud's id of the machine, when newly known.
    pub upstream_id: Option<&'a str>,
    /// The machine's address, when newly known.
    pub ip_address: Option<&'a str>,
    /// Why the instance errored.
    pub error_reason: Option<&'a str>,
    /// What its provider newly says of the machine, by name.
    pub details: Option<&'a serde_json::Value>,
}

/// A row of `instance_events`.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = instance_events, check_for_backend(diesel::pg::Pg))]
pub struct InstanceEvent {
    /// Row id; orders events of one instance.
    pub id: i64,
    /// The instance that changed.
    pub instance_id: InstanceId,
    /// The state it left (none for its first state).
    pub from_state: Option<State>,
    /// The state it entered.
    pub to_state: State,
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
    pub instance_id: InstanceId,
    /// The state it left.
    pub from_state: Option<State>,
    /// The state it entered.
    pub to_state: State,
    /// Why.
    pub reason: Option<&'a str>,
}

/// A row of `pools`.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = pools, check_for_backend(diesel::pg::Pg))]
pub struct PoolRow {
    /// The name requests put in `pool`.
    pub name: String,
    /// The provider config its machines run on.
    pub provider_name: String,
    /// The image they boot.
    pub image: String,
    /// The broker's instance type name.
    pub instance_type: String,
    /// Machines kept booted and unassigned.
    pub min_idle: i32,
    /// Most live instances of the pool, idle, busy and booting.
    pub max_size: i32,
    /// The longest one of its machines lives, in seconds (`None`: the broker's longest).
    pub max_lifetime_secs: Option<i64>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When its shape or size last changed.
    pub updated_at: DateTime<Utc>,
    /// The offerings to fall back to after its own shape has no room
    /// ([`crate::broker::offerings::Fallback`]s, in order).
    pub fallbacks: serde_json::Value,
}

/// A pool's shape and size, as written by `PUT /pools/<name>`.
#[derive(Debug, Insertable, AsChangeset)]
#[diesel(table_name = pools, treat_none_as_null = true)]
pub struct NewPool<'a> {
    /// The name requests put in `pool`.
    pub name: &'a str,
    /// The provider config its machines run on.
    pub provider_name: &'a str,
    /// The image they boot.
    pub image: &'a str,
    /// The broker's instance type name.
    pub instance_type: &'a str,
    /// Machines kept booted and unassigned.
    pub min_idle: i32,
    /// Most live instances of the pool.
    pub max_size: i32,
    /// The longest one of its machines lives, in seconds.
    pub max_lifetime_secs: Option<i64>,
    /// The offerings to fall back to, in order.
    pub fallbacks: serde_json::Value,
}
