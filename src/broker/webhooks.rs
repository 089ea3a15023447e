//! Subscriptions to instance events and their deliveries. A trigger on `instance_events`
//! writes one delivery per matching subscription in the event's own transaction (an
//! outbox: none is lost, none is sent for a change rolled back). Here: who may register
//! what, which addresses a delivery may reach, what it carries and how it is signed, and
//! when a failed one is tried again.

use std::net::IpAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use super::instances::{find_visible, state_named};
use super::model::{Instance, InstanceEvent};
use super::validate::{PoolName, ProviderName};
use super::{admin_only, Broker, BrokerError, State};
use crate::auth::Caller;
use crate::config::{DeliverySettings, Networks};
use crate::db::schema::{instance_events, instances, webhook_deliveries, webhooks};
use crate::db::CacheStatement;
use crate::ids::InstanceId;

/// The channel the outbox trigger notifies when it writes deliveries.
pub const DELIVERIES_CHANNEL: &str = "webhook_deliveries";

/// The shortest signing secret.
const MIN_SECRET_LEN: usize = 16;

/// The longest URL.
const MAX_URL_LEN: usize = 2048;

crate::text_enum! {
    /// What a subscription sends.
    #[derive(Serialize)]
    #[serde(rename_all = "lowercase")]
    pub enum WebhookKind {
        /// The event as signed JSON.
        Webhook => "webhook",
        /// A readable message to a Slack incoming webhook.
        Slack => "slack",
    }
}

crate::text_enum! {
    /// Where a delivery is.
    #[derive(Serialize)]
    #[serde(rename_all = "lowercase")]
    pub enum DeliveryStatus {
        /// Not delivered yet; tried again at `next_attempt_at`.
        Pending => "pending",
        /// The receiver answered 2xx.
        Delivered => "delivered",
        /// Given up on after the retry period.
        Failed => "failed",
    }
}

/// A row of `webhooks`.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = webhooks, check_for_backend(diesel::pg::Pg))]
pub struct Webhook {
    /// Its id.
    pub id: i64,
    /// What it sends.
    pub kind: WebhookKind,
    /// Where.
    pub url: String,
    /// The signing secret, sealed.
    pub secret: Option<Vec<u8>>,
    /// The states whose events it wants; empty: all (an array column's items may be
    /// null to Postgres; none is written).
    pub events: Vec<Option<String>>,
    /// Only instances of this provider config.
    pub provider: Option<String>,
    /// Only instances of this pool.
    pub pool: Option<String>,
    /// Only this instance.
    pub instance_id: Option<InstanceId>,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
    /// When it was deleted.
    pub deleted_at: Option<DateTime<Utc>>,
}

/// A row of `webhook_deliveries`.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = webhook_deliveries, check_for_backend(diesel::pg::Pg))]
pub struct Delivery {
    /// Its id.
    pub id: i64,
    /// Its subscription.
    pub webhook_id: i64,
    /// The event it reports.
    pub event_id: i64,
    /// Where it is.
    pub status: DeliveryStatus,
    /// Attempts made.
    pub attempts: i32,
    /// When it is tried (again).
    pub next_attempt_at: DateTime<Utc>,
    /// While a worker is sending it.
    pub locked_until: Option<DateTime<Utc>>,
    /// The receiver's last status code.
    pub last_status: Option<i32>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the event was written.
    pub created_at: DateTime<Utc>,
    /// When the receiver took it.
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A subscription as asked for, unchecked.
#[derive(Debug, Clone, Default)]
pub struct NewWebhook {
    /// `webhook` (default) or `slack`.
    pub kind: Option<String>,
    /// Where to send.
    pub url: String,
    /// The signing secret (webhooks only).
    pub secret: Option<String>,
    /// States whose events to send; none: all.
    pub events: Vec<String>,
    /// Only instances of this provider config.
    pub provider: Option<String>,
    /// Only instances of this pool.
    pub pool: Option<String>,
    /// Only this instance.
    pub instance: Option<String>,
}

/// Whether a delivery may connect to `ip`: a public address, or one `allowed` names.
pub fn may_reach(ip: IpAddr, allowed: &Networks) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let internal = match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.octets()[0] == 0
                || (v4.octets()[0] == 100 && (64..128).contains(&v4.octets()[1]))
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    !internal || allowed.contains(ip)
}

/// The addresses `url` may be delivered to: every address its host resolves to, each one
/// allowed by [`may_reach`]; refused naming the field `url`.
pub async fn resolve(
    url: &str,
    allowed: &Networks,
) -> Result<(url::Url, Vec<std::net::SocketAddr>), BrokerError> {
    let bad = |message: String| BrokerError::invalid("url", message);
    if url.len() > MAX_URL_LEN {
        return Err(bad(format!("url must be at most {MAX_URL_LEN} characters")));
    }
    let parsed = url::Url::parse(url).map_err(|error| bad(format!("url is not a URL: {error}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("url must be http or https".to_owned()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("url must not carry credentials".to_owned()));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| bad("url has no host".to_owned()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addresses: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|_unresolved| bad(format!("url's host {host:?} does not resolve")))?
        .collect();
    if addresses.is_empty() {
        return Err(bad(format!("url's host {host:?} does not resolve")));
    }
    if let Some(internal) = addresses.iter().find(|a| !may_reach(a.ip(), allowed)) {
        let ip = internal.ip();
        let what = if host == ip.to_string() {
            format!("url points at {ip}")
        } else {
            format!("url's host {host:?} resolves to {ip}")
        };
        return Err(bad(format!(
            "{what}, a loopback, link-local or private address; \
             CLOUDBRAIN_WEBHOOK_ALLOW_NETWORKS may allow it"
        )));
    }
    Ok((parsed, addresses))
}

/// What a webhook delivery's body says: the delivery, the event and its instance.
#[derive(Debug, Serialize)]
pub struct Payload<'a> {
    /// The delivery's id (the same on every attempt: a receiver can drop repeats).
    pub delivery: i64,
    /// The subscription's id.
    pub webhook: i64,
    /// The change.
    pub event: PayloadEvent<'a>,
    /// The instance as it is when the delivery is made.
    pub instance: PayloadInstance<'a>,
}

/// The event in a [`Payload`].
#[derive(Debug, Serialize)]
pub struct PayloadEvent<'a> {
    /// The state left.
    pub from_state: Option<State>,
    /// The state entered.
    pub to_state: State,
    /// Why.
    pub reason: Option<&'a str>,
    /// When.
    pub at: DateTime<Utc>,
}

/// The instance in a [`Payload`].
#[derive(Debug, Serialize)]
pub struct PayloadInstance<'a> {
    /// Its id.
    pub id: InstanceId,
    /// Its provider config.
    pub provider: &'a str,
    /// Its image.
    pub image: &'a str,
    /// Its instance type.
    pub instance_type: &'a str,
    /// Its state now.
    pub state: State,
    /// Its address.
    pub ip_address: Option<&'a str>,
    /// Its pool.
    pub pool: Option<&'a str>,
    /// Why it errored.
    pub error_reason: Option<&'a str>,
}

/// The body of `delivery` of `event` on `instance` to a subscription of `kind`.
pub fn body(
    kind: WebhookKind,
    delivery: &Delivery,
    event: &InstanceEvent,
    instance: &Instance,
) -> String {
    match kind {
        WebhookKind::Webhook => serde_json::to_string(&Payload {
            delivery: delivery.id,
            webhook: delivery.webhook_id,
            event: PayloadEvent {
                from_state: event.from_state,
                to_state: event.to_state,
                reason: event.reason.as_deref(),
                at: event.at,
            },
            instance: PayloadInstance {
                id: instance.id,
                provider: &instance.provider_name,
                image: &instance.image,
                instance_type: &instance.instance_type,
                state: instance.state,
                ip_address: instance.ip_address.as_deref(),
                pool: instance.pool_name.as_deref(),
                error_reason: instance.error_reason.as_deref(),
            },
        })
        .unwrap_or_default(),
        WebhookKind::Slack => {
            let mut text = format!(
                "Instance `{}` on `{}` is now *{}*",
                instance.id,
                instance.provider_name,
                event.to_state.as_str()
            );
            if let Some(pool) = &instance.pool_name {
                text += &format!(" (pool `{pool}`)");
            }
            if let Some(reason) = &event.reason {
                text += &format!(": {reason}");
            }
            serde_json::json!({ "text": text }).to_string()
        }
    }
}

/// The `Cloudbrain-Signature` of `body` sent at `timestamp` (Unix seconds):
/// `sha256=` and the hex HMAC-SHA256, keyed by the secret, of `<timestamp>.<body>`.
pub fn signature(secret: &[u8], timestamp: i64, body: &str) -> String {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// When a delivery that failed its `attempts`-th attempt at `now` is tried again, or
/// `None` when it is past `settings.retry_for` since `created_at` (it is then failed).
pub fn next_attempt(
    settings: &DeliverySettings,
    attempts: i32,
    created_at: DateTime<Utc>,
    now: DateTime<Utc>,
    jitter: f64,
) -> Option<DateTime<Utc>> {
    let exponent = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(30);
    let delay = settings
        .backoff_base
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(settings.backoff_max)
        .mul_f64(1.0 + jitter.clamp(0.0, 1.0) * 0.25);
    let next = now + chrono::Duration::from_std(delay).ok()?;
    let give_up = created_at + chrono::Duration::from_std(settings.retry_for).ok()?;
    (next <= give_up).then_some(next)
}

impl Broker {
    /// Registers a subscription (admin); a URL the settings do not let deliveries reach is
    /// refused, as is a webhook without a secret of at least 16 characters.
    pub async fn add_webhook(
        &self,
        caller: Caller,
        new: NewWebhook,
        allowed: &Networks,
    ) -> Result<Webhook, BrokerError> {
        admin_only(caller, "manage webhooks")?;
        let kind = match new.kind.as_deref() {
            None => WebhookKind::Webhook,
            Some(kind) => WebhookKind::parse(kind)
                .ok_or_else(|| BrokerError::invalid("kind", "kind must be webhook or slack"))?,
        };
        resolve(&new.url, allowed).await?;
        let secret = match (kind, new.secret) {
            (WebhookKind::Webhook, Some(secret)) if secret.chars().count() >= MIN_SECRET_LEN => {
                Some(self.key.seal(secret.as_bytes()))
            }
            (WebhookKind::Webhook, _) => {
                return Err(BrokerError::invalid(
                    "secret",
                    format!("a webhook needs a secret of at least {MIN_SECRET_LEN} characters to sign its deliveries with"),
                ))
            }
            (WebhookKind::Slack, None) => None,
            (WebhookKind::Slack, Some(_)) => {
                return Err(BrokerError::invalid(
                    "secret",
                    "a Slack webhook's URL is its secret; it takes no other",
                ))
            }
        };
        let mut events: Vec<Option<String>> = Vec::new();
        for name in &new.events {
            let state = state_named(name).map_err(|error| match error {
                BrokerError::Invalid { message, .. } => BrokerError::Invalid {
                    field: "events",
                    message,
                },
                other => other,
            })?;
            let name = Some(state.as_str().to_owned());
            if !events.contains(&name) {
                events.push(name);
            }
        }
        let provider = (new.provider.as_deref())
            .map(|p| ProviderName::parse(p).map(|p| p.as_str().to_owned()))
            .transpose()?;
        let pool = (new.pool.as_deref())
            .map(|p| PoolName::parse_as("pool", p).map(|p| p.as_str().to_owned()))
            .transpose()?;
        let mut conn = self.conn().await?;
        let instance_id = match new.instance.as_deref() {
            None => None,
            Some(text) => {
                let id = InstanceId::parse(text).ok_or(BrokerError::NotFound)?;
                Some(find_visible(&mut conn, caller, id, false).await?.id)
            }
        };
        Ok(diesel::insert_into(webhooks::table)
            .values((
                webhooks::kind.eq(kind),
                webhooks::url.eq(&new.url),
                webhooks::secret.eq(secret),
                webhooks::events.eq(events),
                webhooks::provider.eq(provider),
                webhooks::pool.eq(pool),
                webhooks::instance_id.eq(instance_id),
            ))
            .returning(Webhook::as_returning())
            .get_result(&mut conn)
            .await?)
    }

    /// Every subscription not deleted (admin), oldest first.
    pub async fn webhooks(&self, caller: Caller) -> Result<Vec<Webhook>, BrokerError> {
        admin_only(caller, "manage webhooks")?;
        let mut conn = self.conn().await?;
        Ok(webhooks::table
            .filter(webhooks::deleted_at.is_null())
            .order(webhooks::id)
            .select(Webhook::as_select())
            .load(&mut conn)
            .await?)
    }

    /// Deletes a subscription (admin): its pending deliveries are not sent.
    pub async fn delete_webhook(&self, caller: Caller, id: &str) -> Result<Webhook, BrokerError> {
        admin_only(caller, "manage webhooks")?;
        let id = webhook_id(id)?;
        let mut conn = self.conn().await?;
        diesel::update(
            webhooks::table
                .find(id)
                .filter(webhooks::deleted_at.is_null()),
        )
        .set(webhooks::deleted_at.eq(diesel::dsl::now))
        .returning(Webhook::as_returning())
        .get_result(&mut conn)
        .await
        .optional()?
        .ok_or_else(|| BrokerError::NoSuchWebhook(id.to_string()))
    }

    /// A subscription's latest deliveries (admin), newest first, at most `limit`.
    pub async fn deliveries(
        &self,
        caller: Caller,
        id: &str,
        limit: i64,
    ) -> Result<Vec<(Delivery, InstanceEvent)>, BrokerError> {
        admin_only(caller, "manage webhooks")?;
        let id = webhook_id(id)?;
        let mut conn = self.conn().await?;
        live_webhook(&mut conn, id).await?;
        Ok(webhook_deliveries::table
            .inner_join(instance_events::table)
            .filter(webhook_deliveries::webhook_id.eq(id))
            .order(webhook_deliveries::id.desc())
            .limit(limit)
            .select((Delivery::as_select(), InstanceEvent::as_select()))
            .load(&mut conn)
            .await?)
    }

    /// Sends a delivery again from the start (admin): pending, due now, its attempts and
    /// retry period begun anew.
    pub async fn redeliver(
        &self,
        caller: Caller,
        id: &str,
        delivery: &str,
    ) -> Result<(Delivery, InstanceEvent), BrokerError> {
        admin_only(caller, "manage webhooks")?;
        let id = webhook_id(id)?;
        let delivery: i64 = super::numeric_id(delivery).ok_or_else(|| {
            BrokerError::NoSuchWebhook(format!("{id} delivery {}", super::shown_id(delivery)))
        })?;
        let mut conn = self.conn().await?;
        live_webhook(&mut conn, id).await?;
        let target = webhook_deliveries::table
            .find(delivery)
            .filter(webhook_deliveries::webhook_id.eq(id));
        let again = diesel::update(target)
            .set((
                webhook_deliveries::status.eq(DeliveryStatus::Pending),
                webhook_deliveries::attempts.eq(0),
                webhook_deliveries::next_attempt_at.eq(diesel::dsl::now),
                webhook_deliveries::created_at.eq(diesel::dsl::now),
                webhook_deliveries::delivered_at.eq(None::<DateTime<Utc>>),
            ))
            .returning(Delivery::as_returning())
            .get_result(&mut conn)
            .await
            .optional()?
            .ok_or_else(|| BrokerError::NoSuchWebhook(format!("{id} delivery {delivery}")))?;
        diesel::sql_query(format!("NOTIFY {DELIVERIES_CHANNEL}"))
            .execute(&mut conn)
            .await?;
        let event = instance_events::table
            .find(again.event_id)
            .select(InstanceEvent::as_select())
            .first(&mut conn)
            .await?;
        Ok((again, event))
    }
}

/// A webhook id in a path; anything else names none.
fn webhook_id(text: &str) -> Result<i64, BrokerError> {
    super::numeric_id(text).ok_or_else(|| BrokerError::NoSuchWebhook(super::shown_id(text)))
}

async fn live_webhook(
    conn: &mut diesel_async::AsyncPgConnection,
    id: i64,
) -> Result<Webhook, BrokerError> {
    webhooks::table
        .find(id)
        .filter(webhooks::deleted_at.is_null())
        .select(Webhook::as_select())
        .first(conn)
        .await
        .optional()?
        .ok_or_else(|| BrokerError::NoSuchWebhook(id.to_string()))
}

/// A delivery a worker has claimed, with what it needs to send it.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The delivery.
    pub delivery: Delivery,
    /// Its subscription.
    pub webhook: Webhook,
    /// The event.
    pub event: InstanceEvent,
    /// The instance now.
    pub instance: Instance,
}

/// How long a claimed delivery is a worker's before another may take it.
const CLAIM_FOR: Duration = Duration::from_secs(120);

impl Broker {
    /// Whether any webhook subscription exists (deleted ones aside).
    pub async fn any_webhooks(&self) -> Result<bool, BrokerError> {
        let mut conn = self.conn().await?;
        Ok(diesel::select(diesel::dsl::exists(
            webhooks::table.filter(webhooks::deleted_at.is_null()),
        ))
        .get_result(&mut conn)
        .await?)
    }

    /// Claims up to `limit` due deliveries, at most `per_webhook` of each subscription and
    /// none of the subscriptions in `busy` (those with as many in flight already), so that
    /// one slow receiver cannot take every slot.
    pub async fn claim_deliveries(
        &self,
        limit: i64,
        per_webhook: i64,
        busy: &[i64],
    ) -> Result<Vec<Claimed>, BrokerError> {
        let mut conn = self.conn().await?;
        #[derive(QueryableByName)]
        struct Id {
            #[diesel(sql_type = diesel::sql_types::Int8)]
            id: i64,
        }
        let ids: Vec<Id> = diesel::sql_query(
            "UPDATE webhook_deliveries SET locked_until = now() + make_interval(secs => $4), \
                 attempts = attempts + 1 \
             WHERE id IN ( \
                 SELECT id FROM ( \
                     SELECT d.id, d.next_attempt_at, \
                         row_number() OVER (PARTITION BY d.webhook_id ORDER BY d.next_attempt_at, d.id) AS nth \
                     FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
                     WHERE d.status = 'pending' AND d.next_attempt_at <= now() \
                       AND (d.locked_until IS NULL OR d.locked_until < now()) \
                       AND w.deleted_at IS NULL AND d.webhook_id <> ALL($3) \
                 ) due WHERE nth <= $2 ORDER BY next_attempt_at, id LIMIT $1) \
               AND status = 'pending' AND (locked_until IS NULL OR locked_until < now()) \
             RETURNING id",
        )
        .bind::<diesel::sql_types::Int8, _>(limit)
        .bind::<diesel::sql_types::Int8, _>(per_webhook)
        .bind::<diesel::sql_types::Array<diesel::sql_types::Int8>, _>(busy)
        .bind::<diesel::sql_types::Double, _>(CLAIM_FOR.as_secs_f64())
        .cached()
        .load(&mut conn)
        .await?;
        let ids: Vec<i64> = ids.into_iter().map(|i| i.id).collect();
        let rows: Vec<(Delivery, Webhook, InstanceEvent, Instance)> = webhook_deliveries::table
            .inner_join(webhooks::table)
            .inner_join(instance_events::table.inner_join(instances::table))
            .filter(webhook_deliveries::id.eq_any(&ids))
            .order(webhook_deliveries::id)
            .select((
                Delivery::as_select(),
                Webhook::as_select(),
                InstanceEvent::as_select(),
                Instance::as_select(),
            ))
            .load(&mut conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(delivery, webhook, event, instance)| Claimed {
                delivery,
                webhook,
                event,
                instance,
            })
            .collect())
    }

    /// The signing secret of `webhook`, opened.
    pub fn webhook_secret(&self, webhook: &Webhook) -> Result<Vec<u8>, BrokerError> {
        let sealed = webhook.secret.as_deref().unwrap_or_default();
        self.key.open(sealed).map_err(|_unopenable| {
            BrokerError::Internal(anyhow::anyhow!(
                "webhook {}'s secret does not open with this key",
                webhook.id
            ))
        })
    }

    /// Records an attempt: delivered, tried again at `next`, or failed (`next` none).
    pub async fn finish_delivery(
        &self,
        delivery: i64,
        outcome: Result<i32, (Option<i32>, String)>,
        next: Option<DateTime<Utc>>,
    ) -> Result<(), BrokerError> {
        let mut conn = self.conn().await?;
        let target = webhook_deliveries::table.find(delivery);
        match outcome {
            Ok(status) => {
                diesel::update(target)
                    .set((
                        webhook_deliveries::status.eq(DeliveryStatus::Delivered),
                        webhook_deliveries::last_status.eq(Some(status)),
                        webhook_deliveries::last_error.eq(None::<String>),
                        webhook_deliveries::delivered_at.eq(diesel::dsl::now),
                        webhook_deliveries::locked_until.eq(None::<DateTime<Utc>>),
                    ))
                    .execute(&mut conn)
                    .await?;
            }
            Err((status, error)) => {
                let status_after = if next.is_some() {
                    DeliveryStatus::Pending
                } else {
                    DeliveryStatus::Failed
                };
                diesel::update(target)
                    .set((
                        webhook_deliveries::status.eq(status_after),
                        webhook_deliveries::last_status.eq(status),
                        webhook_deliveries::last_error.eq(Some(error)),
                        webhook_deliveries::next_attempt_at.eq(next.unwrap_or_else(Utc::now)),
                        webhook_deliveries::locked_until.eq(None::<DateTime<Utc>>),
                    ))
                    .execute(&mut conn)
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_reach_public_addresses_and_only_the_private_ones_allowed() {
        let none = Networks::default();
        for public in ["93.184.216.34", "2606:2800:220:1::1", "8.8.8.8"] {
            assert!(may_reach(public.parse().unwrap(), &none), "{public}");
        }
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
        ] {
            assert!(!may_reach(internal.parse().unwrap(), &none), "{internal}");
        }
        let loopback = Networks::parse("127.0.0.0/8").unwrap();
        assert!(may_reach("127.0.0.1".parse().unwrap(), &loopback));
        assert!(!may_reach("10.0.0.1".parse().unwrap(), &loopback));
    }

    #[test]
    fn a_signature_is_the_hmac_of_timestamp_and_body() {
        // Computed with Python's hmac:
        // hmac.new(b"0123456789abcdef", b"1700000000.{}", "sha256").hexdigest()
        assert_eq!(
            signature(b"0123456789abcdef", 1_700_000_000, "{}"),
            "sha256=e4f8e2ecae2295b2ddb2f0b5584c8275e226c0ebe9b3b819e70156bb67122e3e"
        );
    }

    #[test]
    fn retries_back_off_and_stop_after_the_retry_period() {
        let settings = DeliverySettings::default();
        let created = Utc::now();
        let first = next_attempt(&settings, 1, created, created, 0.0).unwrap();
        assert_eq!(first - created, chrono::Duration::seconds(1));
        let fifth = next_attempt(&settings, 5, created, created, 0.0).unwrap();
        assert_eq!(fifth - created, chrono::Duration::seconds(16));
        let late = created + chrono::Duration::hours(24);
        assert_eq!(next_attempt(&settings, 30, created, late, 0.0), None);
        let capped = next_attempt(&settings, 30, created, created, 0.0).unwrap();
        assert_eq!(capped - created, chrono::Duration::hours(1));
    }
}
