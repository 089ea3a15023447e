//! Webhooks and Slack: signed deliveries from the outbox, a receiver that is down, slow or
//! failing, what registration refuses.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use cloudbrain::auth::Scope;
use cloudbrain::broker::webhooks::signature;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::common::{exchange, exec, wait_for, TestBroker};

/// What a receiver got: its headers (lower-case names) and body.
#[derive(Debug, Clone)]
struct Received {
    headers: Vec<(String, String)>,
    body: Value,
    raw: String,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        (self.headers.iter())
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    }
}

/// A webhook receiver on loopback that records what it gets and answers `status` after
/// `delay_ms`; it can be stopped and started again on the same port.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    server: Option<actix_web::dev::ServerHandle>,
}

impl Receiver {
    async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut receiver = Self {
            port,
            got: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            server: None,
        };
        receiver.up().await;
        receiver
    }

    async fn up(&mut self) {
        let (got, status, delay) = (self.got.clone(), self.status.clone(), self.delay_ms.clone());
        let server = HttpServer::new(move || {
            let (got, status, delay) = (got.clone(), status.clone(), delay.clone());
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let (got, status, delay) = (got.clone(), status.clone(), delay.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis(delay.load(Ordering::SeqCst))).await;
                    let raw = String::from_utf8_lossy(&body).into_owned();
                    got.lock().unwrap().push(Received {
                        headers: (req.headers().iter())
                            .map(|(n, v)| {
                                (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                            })
                            .collect(),
                        body: serde_json::from_str(&raw).unwrap_or(Value::Null),
                        raw,
                    });
                    let code = actix_web::http::StatusCode::from_u16(status.load(Ordering::SeqCst))
                        .unwrap();
                    HttpResponse::build(code).finish()
                }
            }))
        })
        .workers(1)
        .bind(("127.0.0.1", self.port))
        .unwrap()
        .run();
        self.server = Some(server.handle());
        tokio::spawn(server);
    }

    async fn down(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop(false).await;
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

/// Runs the test broker's webhook sender until the guard is dropped.
struct Sending(watch::Sender<bool>);

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

fn sending(s: &TestBroker) -> Sending {
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(s.workers.webhooks.clone().run(s.db.url.clone(), stopped));
    Sending(stop)
}

const SECRET: &str = "a-secret-of-some-length";

async fn register(s: &TestBroker, body: Value) -> Value {
    let admin = s.client_with(Scope::Admin).await;
    admin.post("/webhooks", &body).await.expect(201)
}

async fn deliveries(s: &TestBroker, webhook: &Value) -> Vec<Value> {
    let admin = s.client_with(Scope::Admin).await;
    let path = format!("/webhooks/{}/deliveries", webhook["id"]);
    admin.get(&path).await.expect(200)["deliveries"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_signed_delivery_reaches_the_receiver_for_each_event_it_asked_for() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    let receiver = Receiver::start().await;
    let hook = register(
        &s,
        json!({"url": receiver.url(), "secret": SECRET, "events": ["running"]}),
    )
    .await;
    assert_eq!(hook["url"], receiver.url());
    assert!(hook.get("secret").is_none(), "{hook}");
    let _sending = sending(&s);

    let id = s.create("ubuntu").await;
    s.settle(&id, "running").await;
    wait_for("the delivery", Duration::from_secs(10), async || {
        !receiver.got().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = receiver.got();
    assert_eq!(got.len(), 1, "only the running event: {got:?}");
    let delivery = &got[0];
    assert_eq!(delivery.body["event"]["to_state"], "running");
    assert_eq!(delivery.body["instance"]["id"], id.as_str());
    assert_eq!(delivery.body["instance"]["state"], "running");
    assert_eq!(delivery.body["webhook"], hook["id"]);
    assert_eq!(delivery.header("content-type"), "application/json");
    let timestamp: i64 = delivery.header("cloudbrain-timestamp").parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - timestamp).abs() < 60);
    // What a receiver does: recompute the signature from its copy of the secret.
    assert_eq!(
        delivery.header("cloudbrain-signature"),
        signature(SECRET.as_bytes(), timestamp, &delivery.raw)
    );
    assert_ne!(
        delivery.header("cloudbrain-signature"),
        signature(b"another-secret-entirely", timestamp, &delivery.raw)
    );
    assert_eq!(
        delivery.header("cloudbrain-delivery"),
        delivery.body["delivery"].to_string()
    );

    wait_for(
        "the delivery recorded",
        Duration::from_secs(5),
        async || {
            deliveries(&s, &hook)
                .await
                .first()
                .is_some_and(|d| d["status"] == "delivered")
        },
    )
    .await;
    let listed = deliveries(&s, &hook).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["attempts"], 1);
    assert_eq!(listed[0]["last_status"], 200);
    assert_eq!(listed[0]["event"]["to_state"], "running");
}

#[tokio::test]
async fn a_receiver_that_is_down_and_comes_back_misses_nothing() {
    const EVENTS: usize = 20;
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    let mut receiver = Receiver::start().await;
    let hook = register(&s, json!({"url": receiver.url(), "secret": SECRET})).await;
    receiver.down().await;
    let _sending = sending(&s);
    let mut ids = Vec::new();
    for _ in 0..EVENTS {
        ids.push(s.create("ubuntu").await);
    }
    // Every delivery fails (nobody listens) and is due again after a backoff.
    wait_for("failed attempts", Duration::from_secs(10), async || {
        let listed = deliveries(&s, &hook).await;
        listed.len() == EVENTS && listed.iter().all(|d| d["attempts"].as_i64() >= Some(2))
    })
    .await;
    let listed = deliveries(&s, &hook).await;
    assert!(
        listed.iter().all(|d| d["status"] == "pending"),
        "{listed:?}"
    );
    let error = listed[0]["last_error"].as_str().unwrap();
    assert!(error.contains("could not deliver"), "{error}");

    receiver.up().await;
    wait_for("every delivery", Duration::from_secs(20), async || {
        deliveries(&s, &hook)
            .await
            .iter()
            .all(|d| d["status"] == "delivered")
    })
    .await;
    let mut instances: Vec<String> = (receiver.got().iter())
        .map(|r| r.body["instance"]["id"].as_str().unwrap().to_owned())
        .collect();
    instances.sort();
    instances.dedup();
    ids.sort();
    assert_eq!(instances, ids, "one delivery per event, none lost");
}

#[tokio::test]
async fn a_slow_receiver_does_not_hold_up_another_subscription() {
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    let slow = Receiver::start().await;
    slow.delay_ms.store(5_000, Ordering::SeqCst);
    let fast = Receiver::start().await;
    let slow_hook = register(&s, json!({"url": slow.url(), "secret": SECRET})).await;
    register(&s, json!({"url": fast.url(), "secret": SECRET})).await;
    let _sending = sending(&s);
    for _ in 0..12 {
        s.create("ubuntu").await;
    }
    // The slow one times out (2 s in tests) two at a time; the fast one gets all twelve.
    wait_for(
        "the fast receiver's deliveries",
        Duration::from_secs(3),
        async || fast.got().len() >= 12,
    )
    .await;
    wait_for("timed out attempts", Duration::from_secs(10), async || {
        let listed = deliveries(&s, &slow_hook).await;
        listed.iter().any(|d| {
            d["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("no answer within 2 s"))
        })
    })
    .await;
}

#[tokio::test]
async fn a_failing_receiver_is_retried_until_the_period_ends_and_can_be_sent_again() {
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    let receiver = Receiver::start().await;
    receiver.status.store(503, Ordering::SeqCst);
    let hook = register(&s, json!({"url": receiver.url(), "secret": SECRET})).await;
    let mut settings = crate::common::delivery_settings();
    settings.retry_for = Duration::from_millis(600);
    let sender = Arc::new(cloudbrain::workers::WebhookSender::new(
        s.workers.broker.clone(),
        settings,
        4,
    ));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(sender.run(s.db.url.clone(), stopped));
    s.create("ubuntu").await;
    wait_for(
        "the delivery to fail",
        Duration::from_secs(10),
        async || {
            deliveries(&s, &hook)
                .await
                .first()
                .is_some_and(|d| d["status"] == "failed")
        },
    )
    .await;
    let failed = &deliveries(&s, &hook).await[0];
    assert_eq!(failed["last_status"], 503);
    assert_eq!(failed["last_error"], "the receiver answered 503");
    assert!(failed["attempts"].as_i64().unwrap() >= 2, "{failed}");
    assert!(receiver.got().len() >= 2);

    receiver.status.store(204, Ordering::SeqCst);
    let admin = s.client_with(Scope::Admin).await;
    let path = format!(
        "/webhooks/{}/deliveries/{}/redeliver",
        hook["id"], failed["id"]
    );
    let again = admin.post(&path, &json!({})).await.expect(200);
    assert_eq!(again["status"], "pending");
    assert_eq!(again["attempts"], 0);
    wait_for(
        "the delivery sent again",
        Duration::from_secs(5),
        async || deliveries(&s, &hook).await[0]["status"] == "delivered",
    )
    .await;
    stop.send_replace(true);
}

#[tokio::test]
async fn deliveries_are_written_with_their_event_and_never_for_a_change_rolled_back() {
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    let receiver = Receiver::start().await;
    let hook = register(
        &s,
        json!({"url": receiver.url(), "secret": SECRET, "events": ["running"]}),
    )
    .await;
    let id = s.create("ubuntu").await;
    let mut conn = s.db.conn().await;
    let write = format!(
        "INSERT INTO instance_events (instance_id, from_state, to_state) VALUES ('{id}', 'creating', 'running')"
    );
    exec(&mut conn, "BEGIN").await;
    exec(&mut conn, &write).await;
    exec(&mut conn, "ROLLBACK").await;
    assert_eq!(deliveries(&s, &hook).await, Vec::<Value>::new());

    exec(&mut conn, &write).await;
    let listed = deliveries(&s, &hook).await;
    assert_eq!(
        listed.len(),
        1,
        "the committed event's delivery, and not the creating one"
    );
    assert_eq!(listed[0]["status"], "pending");
}

#[tokio::test]
async fn a_slack_subscription_posts_a_readable_message_and_hides_its_url() {
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    let receiver = Receiver::start().await;
    let hook = register(
        &s,
        json!({"kind": "slack", "url": receiver.url(), "events": ["creating"]}),
    )
    .await;
    assert_eq!(hook["url"], "http://127.0.0.1/…", "a Slack URL is a secret");
    let _sending = sending(&s);
    let id = s.create("ubuntu").await;
    wait_for("the message", Duration::from_secs(10), async || {
        !receiver.got().is_empty()
    })
    .await;
    let message = &receiver.got()[0];
    assert_eq!(
        message.body,
        json!({"text": format!("Instance `{id}` on `fake` is now *creating*")})
    );
    assert_eq!(message.header("cloudbrain-signature"), "");
}

#[tokio::test]
async fn registration_refuses_unreachable_urls_short_secrets_and_client_tokens() {
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    let admin = s.client_with(Scope::Admin).await;
    let post = |body: &Value| s.app.post("/webhooks", &admin.token).json(body);
    let cases = [
        json!({"url": "http://10.1.2.3/hook", "secret": SECRET}),
        json!({"url": "http://169.254.169.254/latest/meta-data", "secret": SECRET}),
        json!({"url": "http://[fd00::1]/hook", "secret": SECRET}),
        json!({"url": "ftp://example.com/hook", "secret": SECRET}),
        json!({"url": "http://user:pass@127.0.0.1/hook", "secret": SECRET}),
        json!({"url": "not a url", "secret": SECRET}),
        json!({"url": "http://127.0.0.1:9/hook", "secret": "short"}),
        json!({"url": "http://127.0.0.1:9/hook"}),
        json!({"kind": "slack", "url": "http://127.0.0.1:9/hook", "secret": SECRET}),
        json!({"kind": "teams", "url": "http://127.0.0.1:9/hook"}),
        json!({"url": "http://127.0.0.1:9/hook", "secret": SECRET, "events": ["booting"]}),
        json!({"url": "http://127.0.0.1:9/hook", "secret": SECRET, "filter": {"pool": "no/such"}}),
        json!({"url": "http://127.0.0.1:9/hook", "secret": SECRET, "events": "running"}),
    ];
    let mut seen = String::new();
    for body in &cases {
        seen += &exchange(&format!("POST /webhooks {body}"), post(body)).await;
    }
    let client = s
        .app
        .post("/webhooks", &s.token)
        .json(&json!({"url": "http://127.0.0.1:9/", "secret": SECRET}));
    seen += &exchange("POST /webhooks (a client token)", client).await;
    seen += &exchange(
        "DELETE /webhooks/77",
        s.app.delete("/webhooks/77", &admin.token),
    )
    .await;
    seen += &exchange(
        "GET /webhooks/x/deliveries",
        s.app.get("/webhooks/x/deliveries", &admin.token),
    )
    .await;
    insta::assert_snapshot!(seen);
    let listed = admin.get("/webhooks").await.expect(200);
    assert_eq!(listed["webhooks"], json!([]), "nothing was registered");
}

#[tokio::test]
async fn the_sender_listens_for_deliveries_only_while_a_subscription_exists() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    let _sending = sending(&s);
    // No subscription: writes' NOTIFYs wake no session of the sender's.
    let id = s.create("ubuntu").await;
    s.settle(&id, "running").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(s.db.listening("webhook_deliveries").await, 0);

    let receiver = Receiver::start().await;
    let hook = register(
        &s,
        json!({"url": receiver.url(), "secret": SECRET, "events": ["running"]}),
    )
    .await;
    wait_for("the sender to listen", Duration::from_secs(5), async || {
        s.db.listening("webhook_deliveries").await == 1
    })
    .await;
    let id = s.create("ubuntu").await;
    s.settle(&id, "running").await;
    wait_for("the delivery", Duration::from_secs(10), async || {
        receiver.got().len() == 1
    })
    .await;

    let admin = s.client_with(Scope::Admin).await;
    let path = format!("/webhooks/{}", hook["id"]);
    assert_eq!(admin.delete(&path).await.status, 200);
    wait_for(
        "the sender to stop listening",
        Duration::from_secs(5),
        async || s.db.listening("webhook_deliveries").await == 0,
    )
    .await;
}
