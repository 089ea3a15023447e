//! Sends webhook deliveries: claims the due ones (at most [`PER_WEBHOOK`] of a subscription
//! at once, so a slow or dead receiver holds only its own), POSTs each within the attempt
//! timeout to an address checked again as it is sent, signed, and records it delivered,
//! due again after a backoff, or failed once the retry period is over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{watch, Notify, Semaphore};
use tracing::Instrument;

use crate::broker::webhooks::{self, Claimed, WebhookKind, DELIVERIES_CHANNEL};
use crate::broker::Broker;
use crate::config::DeliverySettings;
use crate::db::listen::ListenWhile;

/// Deliveries of one subscription in flight at once.
pub const PER_WEBHOOK: usize = 2;

/// How often the sender looks for due deliveries without being woken (retries come due
/// without a NOTIFY).
const POLL: Duration = Duration::from_millis(500);

/// What an attempt came to: the receiver's 2xx status, or its status (if it answered)
/// and why the attempt failed.
type Attempt = Result<i32, (Option<i32>, String)>;

/// The webhook sender of one worker process.
pub struct WebhookSender {
    broker: Broker,
    settings: DeliverySettings,
    concurrency: usize,
    slots: Arc<Semaphore>,
    in_flight: Arc<Mutex<HashMap<i64, usize>>>,
    wake: Arc<Notify>,
}

impl WebhookSender {
    /// A sender of at most `concurrency` deliveries at once.
    pub fn new(broker: Broker, settings: DeliverySettings, concurrency: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            broker,
            settings,
            concurrency,
            slots: Arc::new(Semaphore::new(concurrency)),
            in_flight: Arc::default(),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Sends deliveries until `shutdown`, woken by the outbox trigger's NOTIFY while some
    /// subscription exists, and listening only then ([`ListenWhile`]). It asks whether
    /// one exists every [`POLL`] while idle; a delivery made before it listens is found
    /// by that poll.
    pub async fn run(self: Arc<Self>, database_url: String, mut shutdown: watch::Receiver<bool>) {
        let mut listening = ListenWhile::new(database_url, DELIVERIES_CHANNEL, self.wake.clone());
        let mut asked: Option<tokio::time::Instant> = None;
        while !*shutdown.borrow() {
            let started = self.send_due().await;
            if started == 0 && asked.is_none_or(|at| at.elapsed() >= POLL) {
                asked = Some(tokio::time::Instant::now());
                // When the database cannot tell, as it was.
                if let Ok(any) = self.broker.any_webhooks().await {
                    listening.set(any);
                }
            }
            if started == 0 {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(POLL) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
        listening.set(false);
        // Deliveries in flight finish (each within the attempt timeout); an unfinished
        // claim lapses and another worker sends it.
        let _ = tokio::time::timeout(
            self.settings.timeout + Duration::from_secs(1),
            self.slots
                .acquire_many(u32::try_from(self.concurrency).unwrap_or(u32::MAX)),
        )
        .await;
    }

    /// Claims what is due and free slots allow and starts sending it; how many it started.
    pub async fn send_due(&self) -> usize {
        let free = self.slots.available_permits();
        if free == 0 {
            return 0;
        }
        let busy: Vec<i64> = (self.in_flight.lock().ok())
            .map(|m| {
                m.iter()
                    .filter(|(_, n)| **n >= PER_WEBHOOK)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        let claimed = match self
            .broker
            .claim_deliveries(free as i64, PER_WEBHOOK as i64, &busy)
            .await
        {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(%error, "claiming webhook deliveries failed");
                return 0;
            }
        };
        let started = claimed.len();
        for claimed in claimed {
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                break;
            };
            let webhook = claimed.webhook.id;
            if let Ok(mut m) = self.in_flight.lock() {
                *m.entry(webhook).or_default() += 1;
            }
            let (broker, settings) = (self.broker.clone(), self.settings.clone());
            let (in_flight, wake) = (self.in_flight.clone(), self.wake.clone());
            tokio::spawn(async move {
                deliver(&broker, &settings, claimed).await;
                if let Ok(mut m) = in_flight.lock() {
                    if let Some(n) = m.get_mut(&webhook) {
                        *n -= 1;
                        if *n == 0 {
                            m.remove(&webhook);
                        }
                    }
                }
                drop(slot);
                wake.notify_one();
            });
        }
        started
    }
}

/// Makes one attempt of a claimed delivery and records what came of it.
async fn deliver(broker: &Broker, settings: &DeliverySettings, claimed: Claimed) {
    let span = tracing::info_span!(
        "webhook delivery",
        delivery.id = claimed.delivery.id,
        webhook.id = claimed.webhook.id
    );
    attempt(broker, settings, claimed).instrument(span).await
}

async fn attempt(broker: &Broker, settings: &DeliverySettings, claimed: Claimed) {
    let Claimed {
        delivery,
        webhook,
        event,
        instance,
    } = &claimed;
    let body = webhooks::body(webhook.kind, delivery, event, instance);
    let attempt = match webhook.kind {
        WebhookKind::Webhook => match broker.webhook_secret(webhook) {
            Ok(secret) => post(settings, &webhook.url, body, Some((&secret, delivery.id))).await,
            Err(error) => Err((None, error.to_string())),
        },
        WebhookKind::Slack => post(settings, &webhook.url, body, None).await,
    };
    let next = match &attempt {
        Ok(_) => None,
        Err(_) => webhooks::next_attempt(
            settings,
            delivery.attempts,
            delivery.created_at,
            Utc::now(),
            rand::random::<f64>(),
        ),
    };
    match &attempt {
        Ok(status) => tracing::info!(status, "webhook delivered"),
        Err((_, why)) => tracing::warn!(
            why,
            attempts = delivery.attempts,
            gives_up = next.is_none(),
            "webhook delivery failed"
        ),
    }
    if let Err(error) = broker.finish_delivery(delivery.id, attempt, next).await {
        // The claim lapses and the delivery is sent again: at least once, never lost.
        tracing::warn!(%error, "recording a webhook delivery failed");
    }
}

/// POSTs `body` to `url` (resolved and checked again now, and connected to only at the
/// addresses checked), signed with `secret` when given.
async fn post(
    settings: &DeliverySettings,
    url: &str,
    body: String,
    signing: Option<(&[u8], i64)>,
) -> Attempt {
    let (url, addresses) = webhooks::resolve(url, &settings.allowed)
        .await
        .map_err(|refused| (None, refused.to_string()))?;
    let host = url.host_str().unwrap_or_default().to_owned();
    let client = reqwest::Client::builder()
        .timeout(settings.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .resolve_to_addrs(&host, &addresses)
        .user_agent(concat!("cloudbrain-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|error| (None, format!("no HTTP client: {}", error.without_url())))?;
    let mut request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    if let Some((secret, delivery)) = signing {
        let timestamp = Utc::now().timestamp();
        request = request
            .header("Cloudbrain-Delivery", delivery.to_string())
            .header("Cloudbrain-Timestamp", timestamp.to_string())
            .header(
                "Cloudbrain-Signature",
                webhooks::signature(secret, timestamp, &body),
            );
    }
    match request.body(body).send().await {
        Ok(response) if response.status().is_success() => Ok(i32::from(response.status().as_u16())),
        Ok(response) => {
            let status = response.status().as_u16();
            Err((
                Some(i32::from(status)),
                format!("the receiver answered {status}"),
            ))
        }
        Err(error) if error.is_timeout() => Err((
            None,
            format!("no answer within {} s", settings.timeout.as_secs_f64()),
        )),
        Err(error) => Err((
            None,
            format!("could not deliver: {}", causes(&error.without_url())),
        )),
    }
}

/// An error and its causes, on one line.
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}
