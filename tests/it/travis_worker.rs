//! Travis CI's job runner as a client: its Cloud Brain backend (travis-ci/worker,
//! `backend/cloudbrain_client.go` and `backend/cloudbrain.go` at d3353da6, MIT), spoken
//! byte for byte where it matters, against the real API and workers.
//!
//! What that client does and this test does with it:
//! - its endpoint is `http://token:<id>-<secret>@host:port/`; Go's http client turns the
//!   URL's userinfo into `Authorization: Basic …`;
//! - `POST instances` with all four fields (`public_ssh_key` empty) and no Content-Type,
//!   and it accepts only 200;
//! - it polls `GET instances/<id>` (after `BOOT_PRE_POLL_SLEEP`, then every
//!   `BOOT_POLL_SLEEP`; 15 s and 3 s by default, shortened here) until `running` or
//!   `errored`, expecting 200 each time, and decodes every field as a Go string;
//! - on an errored or timed-out start it sends `DELETE instances/<id>` expecting 200 with
//!   the instance;
//! - after a job it only GETs the instance (its Stop never deletes).

use std::time::{Duration, Instant};

use crate::common::{fast_settings, TestApp, TestDb, Workers};
use base64::Engine;
use cloudbrain::auth::Scope;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The worker's `cbInstanceData`: every field a Go `string`, so JSON null leaves it empty
/// and anything but a string or null fails the decode.
#[derive(Debug, Default)]
struct CbInstanceData {
    id: String,
    ip_address: String,
    state: String,
    error_reason: String,
}

/// The worker's `cbInstanceRequest`, marshalled by Go's encoding/json: all four fields,
/// in this order, none omitted.
fn cb_instance_request(provider: &str, image: &str, instance_type: &str) -> Vec<u8> {
    format!(
        r#"{{"provider":{},"image":{},"instance_type":{},"public_ssh_key":""}}"#,
        Value::from(provider),
        Value::from(image),
        Value::from(instance_type)
    )
    .into_bytes()
}

/// Go's `json.NewDecoder(resp.Body).Decode(&cbInstanceData{})`.
fn go_decode(body: &[u8]) -> Result<CbInstanceData, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("couldn't decode json response: {e}"))?;
    let field = |name: &str| {
        match &value[name] {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        other => Err(format!(
            "json: cannot unmarshal {other} into Go struct field cbInstanceData.{name} of type string"
        )),
    }
    };
    for name in [
        "id",
        "image",
        "ip_address",
        "provider",
        "state",
        "upstream_id",
        "error_reason",
    ] {
        field(name)?;
    }
    Ok(CbInstanceData {
        id: field("id")?,
        ip_address: field("ip_address")?,
        state: field("state")?,
        error_reason: field("error_reason")?,
    })
}

/// The worker's `cbClient`, sending what Go's net/http sends for it.
struct CbClient {
    host: String,
    authorization: String,
}

impl CbClient {
    /// `url.Parse(ENDPOINT)`: the userinfo becomes HTTP Basic on every request.
    fn new(endpoint: &str) -> Self {
        let rest = endpoint.strip_prefix("http://").unwrap();
        let (userinfo, host) = rest.split_once('@').unwrap();
        let host = host.trim_end_matches('/').to_owned();
        let basic = base64::engine::general_purpose::STANDARD.encode(userinfo);
        Self {
            host,
            authorization: format!("Basic {basic}"),
        }
    }

    async fn create(&self, body: Vec<u8>) -> Result<CbInstanceData, String> {
        self.http_request("POST", "/instances", Some(body), 200)
            .await
            .map_err(|e| format!("error creating instance: {e}"))
    }

    async fn get(&self, id: &str) -> Result<CbInstanceData, String> {
        self.http_request("GET", &format!("/instances/{id}"), None, 200)
            .await
            .map_err(|e| format!("error getting instance: {e}"))
    }

    async fn delete(&self, id: &str) -> Result<CbInstanceData, String> {
        self.http_request("DELETE", &format!("/instances/{id}"), None, 200)
            .await
            .map_err(|e| format!("error deleting instance: {e}"))
    }

    /// One request as Go 1.x writes it (no Content-Type: `http.NewRequest` sets none), and
    /// the client's check: exactly `expected`, then a decodable instance.
    async fn http_request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        expected: u16,
    ) -> Result<CbInstanceData, String> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: Go-http-client/1.1\r\n",
            self.host
        );
        if let Some(body) = &body {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str(&format!(
            "Authorization: {}\r\nAccept-Encoding: gzip\r\n\r\n",
            self.authorization
        ));
        let mut stream = TcpStream::connect(&self.host)
            .await
            .map_err(|e| format!("error sending request: {e}"))?;
        stream.write_all(head.as_bytes()).await.unwrap();
        if let Some(body) = &body {
            stream.write_all(body).await.unwrap();
        }
        let (status, body) = read_response(&mut stream).await;
        if status != expected {
            return Err(format!(
                "expected {expected} response code, got status={status} body={}",
                String::from_utf8_lossy(&body)
            ));
        }
        go_decode(&body)
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body.
async fn read_response(stream: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let header_end = loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed mid-response: {raw:?}");
        raw.extend_from_slice(&buf[..n]);
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&raw[..header_end]).to_string();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    while raw.len() < header_end + length {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed mid-body");
        raw.extend_from_slice(&buf[..n]);
    }
    (status, raw[header_end..header_end + length].to_vec())
}

/// The worker's `BOOT_PRE_POLL_SLEEP` and `BOOT_POLL_SLEEP`, shortened.
const PRE_POLL: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_millis(200);

/// How the worker's `Start` ended.
#[derive(Debug)]
enum Started {
    Running(CbInstanceData),
    Failed(String),
}

/// `cbProvider.Start`: create, wait for an IP, and on an error or a timeout delete the
/// abandoned instance (its deferred `p.client.Delete`), reporting what that delete got.
async fn start(
    client: &CbClient,
    request: Vec<u8>,
    boot_timeout: Duration,
) -> (Started, Option<Result<CbInstanceData, String>>) {
    let created = match client.create(request).await {
        Ok(created) => created,
        Err(error) => return (Started::Failed(error), None),
    };
    assert_eq!(created.state, "creating");
    let deadline = Instant::now() + boot_timeout;
    tokio::time::sleep(PRE_POLL).await;
    let outcome = loop {
        if Instant::now() > deadline {
            break Started::Failed("context deadline exceeded".to_owned());
        }
        let instance = match client.get(&created.id).await {
            Ok(instance) => instance,
            Err(error) => break Started::Failed(error),
        };
        match instance.state.as_str() {
            "running" => break Started::Running(instance),
            "errored" => {
                break Started::Failed(format!(
                    "encountered an error while waiting for instance insert operation: {}",
                    instance.error_reason
                ))
            }
            _ => tokio::time::sleep(POLL).await,
        }
    };
    let deleted = match outcome {
        Started::Running(_) => None,
        Started::Failed(_) => Some(client.delete(&created.id).await),
    };
    (outcome, deleted)
}

struct Broker {
    db: TestDb,
    app: TestApp,
    endpoint: String,
    token: String,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Broker {
    /// The instance as the API shows it, read with the worker's token.
    async fn body(&self, id: &str) -> Value {
        self.app.instance(&self.token, id).await.1
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The API with a create worker and a refresh worker running, a fake provider named
/// `provider` with `config`, and the endpoint a Travis worker would be given.
async fn broker(provider: &str, config: Value) -> Broker {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;
    app.provider(provider, config).await;
    let token = app.token(Scope::Client).await;
    let workers = Workers::new(&db.url, fast_settings());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(workers.jobs.clone().run(db.url.clone(), shutdown.clone()));
    tokio::spawn(workers.refresh.clone().run(shutdown));
    let endpoint = format!(
        "http://token:{token}@{}/",
        app.base.trim_start_matches("http://")
    );
    Broker {
        db,
        app,
        endpoint,
        token,
        stop,
    }
}

#[tokio::test]
async fn a_travis_worker_starts_a_job_on_a_default_machine_and_reads_its_address() {
    let broker = broker("gce-staging", json!({"boot_time_ms": 300})).await;
    let client = CbClient::new(&broker.endpoint);
    let request = cb_instance_request(
        "gce-staging",
        "travis-ci-garnet-trusty-1512502259-986baf0",
        "default",
    );
    let (started, deleted) = start(&client, request, Duration::from_secs(20)).await;
    let Started::Running(running) = started else {
        panic!("the job could not start: {started:?}");
    };
    assert!(deleted.is_none());
    // It ssh-es to the address it reads once running.
    let ip: std::net::IpAddr = running.ip_address.parse().expect("an IP address");
    assert!(!ip.is_unspecified());
    // `default` booted the provider's default type.
    assert_eq!(broker.body(&running.id).await["instance_type"], "standard");
    // The empty `public_ssh_key` is no key at all.
    let mut conn = broker.db.conn().await;
    let key = crate::common::text(
        &mut conn,
        &format!(
            "SELECT public_ssh_key AS v FROM instances WHERE id = '{}'",
            running.id
        ),
    )
    .await;
    assert_eq!(key, None);
    // After the job, its Stop only reads the instance back.
    client.get(&running.id).await.unwrap();
}

#[tokio::test]
async fn a_premium_job_gets_the_premium_type() {
    let broker = broker("gce-staging", json!({"boot_time_ms": 0})).await;
    let client = CbClient::new(&broker.endpoint);
    let request = cb_instance_request("gce-staging", "travis-ci-amethyst", "premium");
    let (started, _) = start(&client, request, Duration::from_secs(20)).await;
    let Started::Running(running) = started else {
        panic!("the job could not start: {started:?}");
    };
    assert_eq!(broker.body(&running.id).await["instance_type"], "premium");
}

#[tokio::test]
async fn an_errored_start_reads_the_reason_and_deletes_the_instance() {
    let broker = broker(
        "gce-staging",
        json!({"boot_time_ms": 0, "invalid_images": ["travis-ci-gone"]}),
    )
    .await;
    let client = CbClient::new(&broker.endpoint);
    let request = cb_instance_request("gce-staging", "travis-ci-gone", "default");
    let (started, deleted) = start(&client, request, Duration::from_secs(20)).await;
    let Started::Failed(error) = started else {
        panic!("a start from a missing image ran: {started:?}");
    };
    assert!(
        error.contains("travis-ci-gone"),
        "the reason should name the image: {error}"
    );
    let deleted = deleted
        .unwrap()
        .expect("DELETE answers 200 with the instance");
    assert_eq!(deleted.state, "terminating");
}

#[tokio::test]
async fn a_start_that_times_out_deletes_the_instance() {
    let broker = broker("gce-staging", json!({"boot_time_ms": 600_000})).await;
    let client = CbClient::new(&broker.endpoint);
    let request = cb_instance_request("gce-staging", "travis-ci-slow", "default");
    let (started, deleted) = start(&client, request, Duration::from_secs(1)).await;
    assert!(matches!(started, Started::Failed(ref e) if e.contains("deadline")));
    let deleted = deleted
        .unwrap()
        .expect("DELETE answers 200 with the instance");
    assert_eq!(deleted.state, "terminating");
}

#[tokio::test]
async fn a_wrong_token_in_the_endpoint_is_an_error_the_worker_can_read() {
    let broker = broker("gce-staging", json!({})).await;
    let endpoint = broker.endpoint.replacen("token:", "token:9", 1);
    let client = CbClient::new(&endpoint);
    let error = client
        .create(cb_instance_request("gce-staging", "travis-ci", "default"))
        .await
        .unwrap_err();
    assert!(error.contains("got status=401"), "{error}");
}
