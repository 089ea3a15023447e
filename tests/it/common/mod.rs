//! Test harness: a database per test from a migrated template, and the real API served on
//! a loopback port.

pub mod fake_compute;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use cloudbrain::api::{self, AppState};
use cloudbrain::auth::verifier::ScryptLimits;
use cloudbrain::auth::{store, Scope, TokenVerifier};
use cloudbrain::broker::providers::insert_provider;
use cloudbrain::broker::stream::Hub;
use cloudbrain::broker::Broker;
use cloudbrain::broker::State;
use cloudbrain::config::Networks;
use cloudbrain::crypto::SecretKey;
use cloudbrain::db;
use cloudbrain::db::schema::{instance_events, instances, jobs};
use cloudbrain::ids::InstanceId;
use cloudbrain::queue::JobKind;
use diesel::{ExpressionMethods, QueryDsl, SelectableHelper};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use sha2::{Digest, Sha256};

/// A directory of the test's own under the system's temp directory, removed with
/// everything in it (a `.netrc` with a token, say) when the test ends, pass or fail.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The encryption key every test uses.
pub const KEY_HEX: &str = "8f2b6c1d4e5a69780a1b2c3d4e5f60718293a4b5c6d7e8f90112233445566778";

pub fn key() -> SecretKey {
    SecretKey::from_hex(KEY_HEX).unwrap()
}

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .expect("TEST_DATABASE_URL or DATABASE_URL must point at a Postgres server (script/test sets it)")
}

/// `url` with its database name replaced by `name`.
pub fn url_for(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let authority_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    format!("{base}/{name}{query}")
}

/// Names the template after the migrations' contents, so a changed migration gets a new one.
fn template_name() -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut entries: Vec<_> = walk(&dir);
    entries.sort();
    let mut hasher = Sha256::new();
    for path in entries {
        hasher.update(path.to_string_lossy().as_bytes());
        hasher.update(std::fs::read(&path).unwrap());
    }
    format!("cloudbrain_tpl_{}", &hex::encode(hasher.finalize())[..16])
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// With `TEST_LOG=1`, a test prints what cloudbrain logs (`RUST_LOG` filters it;
/// default `info`).
fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if std::env::var_os("TEST_LOG").is_none() {
        return;
    }
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDb {
    pub url: String,
    name: String,
    /// The jobs (`kind status`) the test must end with; `None`: not checked.
    jobs_at_end: std::sync::Mutex<Option<Vec<String>>>,
}

impl TestDb {
    pub async fn new() -> Self {
        init_logs();
        let admin = admin_url();
        let mut conn = AsyncPgConnection::establish(&admin)
            .await
            .expect("connect to the test server");
        let template = template_name();
        diesel::sql_query("SELECT pg_advisory_lock(4242)")
            .execute(&mut conn)
            .await
            .unwrap();
        let exists: i64 = count(
            &mut conn,
            &format!("SELECT count(*) AS n FROM pg_database WHERE datname = '{template}'"),
        )
        .await;
        if exists == 0 {
            let building = format!("{template}_building");
            diesel::sql_query(format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
                .execute(&mut conn)
                .await
                .unwrap();
            diesel::sql_query(format!("CREATE DATABASE {building}"))
                .execute(&mut conn)
                .await
                .unwrap();
            db::run_migrations(&url_for(&admin, &building))
                .await
                .unwrap();
            diesel::sql_query(format!("ALTER DATABASE {building} RENAME TO {template}"))
                .execute(&mut conn)
                .await
                .unwrap();
        }
        let name = format!("cloudbrain_test_{}", uuid::Uuid::new_v4().simple());
        diesel::sql_query(format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .execute(&mut conn)
            .await
            .unwrap();
        diesel::sql_query("SELECT pg_advisory_unlock(4242)")
            .execute(&mut conn)
            .await
            .unwrap();
        Self {
            url: url_for(&admin, &name),
            name,
            jobs_at_end: Default::default(),
        }
    }

    /// The test fails if it ends with any job queued or dead.
    pub fn jobs_must_settle(&self) {
        self.ends_with_jobs(&[]);
    }

    /// The test fails unless it ends with exactly these jobs (`"create dead"`, …).
    pub fn ends_with_jobs(&self, jobs: &[&str]) {
        let mut jobs: Vec<String> = jobs.iter().map(|j| j.to_string()).collect();
        jobs.sort();
        *self.jobs_at_end.lock().unwrap() = Some(jobs);
    }

    pub async fn conn(&self) -> AsyncPgConnection {
        AsyncPgConnection::establish(&self.url).await.unwrap()
    }
}

/// Which jobs [`TestDb::count_jobs`] counts.
pub enum Jobs<'a> {
    /// Every job, of any instance, kind and status.
    All,
    /// The jobs of one instance.
    Of(&'a str),
    /// The jobs of one kind of one instance.
    OfKind(&'a str, JobKind),
    /// The jobs a worker holds a lease on.
    Leased,
}

/// Rows a test reads and writes through the schema, not SQL text.
impl TestDb {
    /// How many instances there are, in `state` or in any.
    pub async fn count_instances(&self, state: Option<State>) -> i64 {
        self.count_in(state.map_or_else(|| State::ALL.to_vec(), |s| vec![s]))
            .await
    }

    /// How many instances are in one of `states`, counted at one moment (states summed
    /// from several counts would count a row moving between them twice).
    pub async fn count_in(&self, states: Vec<State>) -> i64 {
        instances::table
            .filter(instances::state.eq_any(states))
            .count()
            .get_result(&mut self.conn().await)
            .await
            .unwrap()
    }

    /// How many sessions of this database (other than the asking one) last ran
    /// `LISTEN channel`: those Postgres wakes for every NOTIFY.
    pub async fn listening(&self, channel: &str) -> i64 {
        let mut conn = self.conn().await;
        let sql = format!(
            "SELECT count(*)::text AS v FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND query = 'LISTEN {channel}'"
        );
        text(&mut conn, &sql).await.unwrap().parse().unwrap()
    }

    /// How many jobs there are of those `which` names.
    pub async fn count_jobs(&self, which: Jobs<'_>) -> i64 {
        let mut query = jobs::table.into_boxed();
        query = match which {
            Jobs::All => query,
            Jobs::Of(id) => query.filter(jobs::instance_id.eq(instance_id(id))),
            Jobs::OfKind(id, kind) => query
                .filter(jobs::instance_id.eq(instance_id(id)))
                .filter(jobs::kind.eq(kind)),
            Jobs::Leased => query.filter(jobs::locked_by.is_not_null()),
        };
        query
            .count()
            .get_result(&mut self.conn().await)
            .await
            .unwrap()
    }

    /// How many instance events there are.
    pub async fn count_events(&self) -> i64 {
        instance_events::table
            .count()
            .get_result(&mut self.conn().await)
            .await
            .unwrap()
    }

    /// Seconds until the instance's first job may run (negative: overdue).
    pub async fn job_due_in(&self, id: &str) -> i64 {
        let run_at: chrono::DateTime<chrono::Utc> = jobs::table
            .filter(jobs::instance_id.eq(instance_id(id)))
            .order(jobs::id)
            .select(jobs::run_at)
            .first(&mut self.conn().await)
            .await
            .unwrap();
        (run_at - chrono::Utc::now()).num_seconds()
    }

    /// Puts the instance in `state` behind the broker's back.
    pub async fn force_state(&self, id: &str, state: State) {
        let terminated_at = (state == State::Terminated).then(chrono::Utc::now);
        diesel::update(instances::table.find(instance_id(id)))
            .set((
                instances::state.eq(state),
                instances::terminated_at.eq(terminated_at),
            ))
            .execute(&mut self.conn().await)
            .await
            .unwrap();
    }

    /// Leases the instance's jobs to `worker` for a minute, as if it had claimed them.
    pub async fn lease_jobs(&self, id: &str, worker: &str) {
        diesel::update(jobs::table.filter(jobs::instance_id.eq(instance_id(id))))
            .set((
                jobs::locked_by.eq(worker),
                jobs::locked_until.eq(chrono::Utc::now() + chrono::Duration::minutes(1)),
            ))
            .execute(&mut self.conn().await)
            .await
            .unwrap();
    }

    /// How many machines the fake cloud holds in this database, for every provider name.
    pub async fn machines(&self) -> i64 {
        fake_machines(&self.url).await
    }
}

/// How many machines the fake cloud whose store is the database at `url` holds.
pub async fn fake_machines(url: &str) -> i64 {
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    // The fake cloud makes its table on first use; no table, no machines.
    let table = "SELECT to_regclass('fake_cloud.machines')::text AS v";
    if text(&mut conn, table).await.is_none() {
        return 0;
    }
    count(&mut conn, "SELECT count(*) AS n FROM fake_cloud.machines").await
}

fn instance_id(id: &str) -> InstanceId {
    InstanceId::parse(id).unwrap()
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let url = self.url.clone();
        let expected = self
            .jobs_at_end
            .lock()
            .unwrap()
            .clone()
            .filter(|_| !std::thread::panicking());
        let check = expected.is_some();
        // Drop runs outside any async context we can borrow: use a runtime of its own.
        let left = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut left = Vec::new();
                if check {
                    if let Ok(mut conn) = AsyncPgConnection::establish(&url).await {
                        #[derive(diesel::QueryableByName)]
                        struct Left {
                            #[diesel(sql_type = diesel::sql_types::Text)]
                            job: String,
                            #[diesel(sql_type = diesel::sql_types::Text)]
                            detail: String,
                        }
                        let jobs: Vec<Left> = diesel::sql_query(
                            "SELECT kind || ' ' || status AS job, 'attempts ' || attempts || \
                             ': ' || coalesce(last_error, '-') AS detail FROM jobs ORDER BY 1",
                        )
                        .load(&mut conn)
                        .await
                        .unwrap_or_default();
                        left.extend(jobs.into_iter().map(|j| (j.job, j.detail)));
                    }
                }
                if let Ok(mut conn) = AsyncPgConnection::establish(&admin_url()).await {
                    let _ =
                        diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&mut conn)
                            .await;
                }
                left
            })
        })
        .join()
        .unwrap_or_default();
        if let Some(expected) = expected {
            let jobs: Vec<&String> = left.iter().map(|(job, _)| job).collect();
            assert_eq!(
                jobs,
                expected.iter().collect::<Vec<_>>(),
                "the jobs left when the test ended: {left:?}"
            );
        }
    }
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Runs a `SELECT count(*) AS n …` query.
pub async fn count(conn: &mut AsyncPgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Count>(conn)
        .await
        .unwrap()
        .n
}

/// The instance ids of every machine `provider` lists, sorted.
pub async fn machine_ids(provider: &dyn cloudbrain_provider::Provider) -> Vec<uuid::Uuid> {
    let mut ids: Vec<uuid::Uuid> = provider
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    ids.sort();
    ids
}

/// Waits until `check` holds, looking every 50 ms; fails the test after `limit`, naming
/// `what` it waited for.
pub async fn wait_for(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An answer as a client sees it: the status and the body (JSON, or null).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Answer {
    /// Asserts the status and hands back the body.
    pub fn expect(self, status: u16) -> serde_json::Value {
        assert_eq!(self.status, status, "{}", self.body);
        self.body
    }
}

/// One Server-Sent Event as a reader gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sse {
    pub id: Option<String>,
    pub event: String,
    pub data: serde_json::Value,
}

impl Sse {
    /// The id of the event's instance.
    pub fn instance(&self) -> &str {
        self.data["instance"]["id"].as_str().unwrap_or_default()
    }

    /// The state the event entered.
    pub fn to_state(&self) -> &str {
        self.data["event"]["to_state"].as_str().unwrap_or_default()
    }
}

/// An open `text/event-stream` answer, read as a browser's EventSource reads it.
pub struct SseReader {
    response: reqwest::Response,
    buffer: String,
    /// Heartbeat comments seen so far.
    pub heartbeats: usize,
    /// Whether the server ended the stream.
    pub ended: bool,
}

impl SseReader {
    /// The next event, if one comes within `limit` (and the stream is open).
    pub async fn next(&mut self, limit: Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = self.parse(&block) {
                    return Some(event);
                }
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buffer.push_str(std::str::from_utf8(&bytes).unwrap()),
                Ok(_) => self.ended = true,
                Err(_) => return None,
            }
        }
    }

    /// The next `n` events, failing the test if they do not come within `limit`.
    pub async fn take(&mut self, n: usize, limit: Duration) -> Vec<Sse> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut events = Vec::new();
        while events.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(event) => events.push(event),
                None => panic!("{} of {n} events came within {limit:?}", events.len()),
            }
        }
        events
    }

    /// Every event until none comes for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Sse> {
        let mut events = Vec::new();
        while let Some(event) = self.next(quiet).await {
            events.push(event);
        }
        events
    }

    fn parse(&mut self, block: &str) -> Option<Sse> {
        let (mut id, mut event, mut data) = (None, None, String::new());
        for line in block.lines() {
            if line.starts_with(':') {
                self.heartbeats += 1;
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("event: ") {
                event = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            }
        }
        Some(Sse {
            id,
            event: event?,
            data: serde_json::from_str(&data).unwrap(),
        })
    }
}

/// A client of the API with one token.
pub struct Client<'a> {
    app: &'a TestApp,
    pub token: String,
}

impl Client<'_> {
    async fn answer(request: reqwest::RequestBuilder) -> Answer {
        Self::answer_of(request.send().await.unwrap()).await
    }

    async fn answer_of(response: reqwest::Response) -> Answer {
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Answer { status, body }
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> Answer {
        Self::answer(self.app.get(path, &self.token)).await
    }

    /// POST `body` as JSON to `path`.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Answer {
        Self::answer(self.app.post(path, &self.token).json(body)).await
    }

    /// PUT `body` as JSON to `path`.
    pub async fn put(&self, path: &str, body: &serde_json::Value) -> Answer {
        let request = self.app.client.put(self.app.url(path));
        let request = request.header("Authorization", format!("token {}", self.token));
        Self::answer(request.json(body)).await
    }

    /// POST `body` as JSON to `path` with an `Idempotency-Key`.
    pub async fn post_keyed(&self, path: &str, key: &str, body: &serde_json::Value) -> Answer {
        let request = self.app.post(path, &self.token);
        Self::answer(request.header("Idempotency-Key", key).json(body)).await
    }

    /// Opens `/stream/instances?<query>`, resuming after `last_event_id`: the answer when
    /// it is refused, the open stream when not.
    pub async fn stream(
        &self,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Result<SseReader, Answer> {
        let mut request = self
            .app
            .get(&format!("/stream/instances?{query}"), &self.token);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        if response.status() != 200 {
            return Err(Self::answer_of(response).await);
        }
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Ok(SseReader {
            response,
            buffer: String::new(),
            heartbeats: 0,
            ended: false,
        })
    }

    /// DELETE `path`.
    pub async fn delete(&self, path: &str) -> Answer {
        Self::answer(self.app.delete(path, &self.token)).await
    }
}

/// An OpenSSH public key line for tests.
pub const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ci@example";

/// What a user sees of one exchange, for a snapshot: what was asked, the status line and
/// the body (pretty JSON when it is JSON).
pub async fn exchange(asked: &str, request: reqwest::RequestBuilder) -> String {
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    let body = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(json) => serde_json::to_string_pretty(&json).unwrap(),
        Err(_) => text,
    };
    format!(
        "> {asked}\n< {} {}\n{body}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default()
    )
}

/// The networks a test's webhooks may reach: loopback, where the receivers listen.
pub fn loopback() -> Networks {
    Networks::parse("127.0.0.0/8, ::1").unwrap()
}

/// How often a test server's idle event streams get a heartbeat.
pub const STREAM_HEARTBEAT: Duration = Duration::from_millis(300);

/// The API served on a loopback port against a test database.
pub struct TestApp {
    pub base: String,
    pub verifier: Arc<TokenVerifier>,
    pub client: reqwest::Client,
    pub db_url: String,
    server: actix_web::dev::ServerHandle,
}

impl TestApp {
    pub async fn spawn(db: &TestDb) -> Self {
        Self::spawn_on(&db.url).await
    }

    /// Serves the API against any database URL (also an unreachable one).
    pub async fn spawn_on(db_url: &str) -> Self {
        Self::spawn_with(db_url, Networks::default(), ScryptLimits::default()).await
    }

    /// Serves the API believing `X-Forwarded-For` from `trusted`, within `scrypt`'s limits.
    pub async fn spawn_with(db_url: &str, trusted: Networks, scrypt: ScryptLimits) -> Self {
        let pool = db::pool(db_url, 8, db::Statements::Prepared).unwrap();
        let verifier = Arc::new(TokenVerifier::with_limits(
            pool.clone(),
            Duration::from_secs(300),
            scrypt,
        ));
        tokio::spawn(verifier.clone().listen_for_revocations(db_url.to_owned()));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let broker = Broker::new(pool.clone(), key());
        let stream = Hub::new(broker.clone(), STREAM_HEARTBEAT);
        tokio::spawn(stream.clone().run(db_url.to_owned()));
        let state = AppState {
            stream,
            webhook_networks: loopback(),
            broker,
            verifier: verifier.clone(),
            request_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(1),
            trusted_proxies: trusted,
            metrics: Default::default(),
            worker_pools: None,
        };
        let server = api::serve(listener, state, Duration::from_secs(5)).unwrap();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            base,
            verifier,
            client: reqwest::Client::new(),
            db_url: db_url.to_owned(),
            server: handle,
        }
    }

    /// A client of this server with `token`.
    pub fn client(&self, token: &str) -> Client<'_> {
        Client {
            app: self,
            token: token.to_owned(),
        }
    }

    /// Waits until revocations are being heard.
    pub async fn listening(&self) {
        for _ in 0..200 {
            if self.verifier.is_listening() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("revocation listener never connected");
    }

    pub async fn token(&self, scope: Scope) -> String {
        let mut conn = AsyncPgConnection::establish(&self.db_url).await.unwrap();
        store::create_token(&mut conn, "test", scope)
            .await
            .unwrap()
            .to_string()
    }

    pub async fn provider(&self, name: &str, config: serde_json::Value) {
        self.provider_of("fake", name, config).await;
    }

    pub async fn provider_of(&self, kind: &str, name: &str, config: serde_json::Value) {
        let mut conn = AsyncPgConnection::establish(&self.db_url).await.unwrap();
        insert_provider(&mut conn, &key(), name, kind, &config)
            .await
            .unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn get(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.client
            .get(self.url(path))
            .header("Authorization", format!("token {token}"))
    }

    /// GET `path` as `token`: the body as JSON, whatever the status.
    pub async fn get_json(&self, path: &str, token: &str) -> serde_json::Value {
        let response = self.get(path, token).send().await.unwrap();
        response.json().await.unwrap()
    }

    pub fn post(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.client
            .post(self.url(path))
            .header("Authorization", format!("token {token}"))
    }

    pub fn delete(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.client
            .delete(self.url(path))
            .header("Authorization", format!("token {token}"))
    }

    /// The status of an unauthenticated GET of `path`.
    pub async fn anonymous_status(&self, path: &str) -> u16 {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        response.status().as_u16()
    }

    /// GET /instances/<id> with `token`: the status and the body.
    pub async fn instance(&self, token: &str, id: &str) -> (u16, serde_json::Value) {
        let response = self
            .get(&format!("/instances/{id}"), token)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// Creates an instance on `provider` and returns its id.
    pub async fn create_on(&self, token: &str, provider: &str, image: &str) -> String {
        let response = self
            .post("/instances", token)
            .json(&serde_json::json!({"provider": provider, "image": image}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        let body: serde_json::Value = response.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    /// Creates an instance on provider `fake` and returns its body.
    pub async fn create(&self, token: &str, image: &str) -> serde_json::Value {
        let response = self
            .post("/instances", token)
            .json(&serde_json::json!({"provider": "fake", "image": image}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        response.json().await.unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let handle = self.server.clone();
        drop(handle.stop(false));
    }
}

/// The workers, in this process, against a test database.
pub struct Workers {
    pub broker: cloudbrain::broker::Broker,
    pub webhooks: Arc<cloudbrain::workers::WebhookSender>,
    pub registry: Arc<cloudbrain::providers::Registry>,
    pub jobs: Arc<cloudbrain::workers::JobWorker>,
    pub refresh: Arc<cloudbrain::workers::RefreshWorker>,
    pub metrics: Arc<cloudbrain::metrics::Metrics>,
}

impl Workers {
    pub fn new(db_url: &str, settings: cloudbrain::config::WorkerSettings) -> Self {
        let pool = db::pool(db_url, 8, db::Statements::Prepared).unwrap();
        let broker = Broker::new(pool.clone(), key());
        let metrics = Arc::new(cloudbrain::metrics::Metrics::default());
        let registry = Arc::new(cloudbrain::providers::Registry::new(metrics.clone()));
        let context = cloudbrain::workers::JobContext {
            broker: broker.clone(),
            queue: cloudbrain::queue::Queue::new(pool.clone()),
            providers: registry.clone(),
            metrics: metrics.clone(),
        };
        let jobs = Arc::new(cloudbrain::workers::job_worker(
            cloudbrain::workers::worker_id("test"),
            context,
            settings.clone(),
        ));
        let refresh = Arc::new(cloudbrain::workers::RefreshWorker::new(
            db_url.to_owned(),
            broker.clone(),
            registry.clone(),
            settings,
            metrics.clone(),
        ));
        let webhooks = Arc::new(cloudbrain::workers::WebhookSender::new(
            broker.clone(),
            delivery_settings(),
            8,
        ));
        Self {
            webhooks,
            broker,
            registry,
            jobs,
            refresh,
            metrics,
        }
    }

    /// Runs the job worker until no job is runnable.
    pub async fn run_pending_jobs(&self) -> usize {
        self.jobs.run_until_idle().await.unwrap()
    }
}

/// A fake cloud config whose machines live in the database at `url`, so that several
/// processes (or registries) see one cloud and a test can count its machines with SQL.
pub fn shared_store(mut config: serde_json::Value, url: &str) -> serde_json::Value {
    if config.is_null() {
        config = serde_json::json!({});
    }
    config["store_url"] = url.into();
    config
}

/// Webhook delivery settings for tests: receivers on loopback, quick retries, 2 s attempts.
pub fn delivery_settings() -> cloudbrain::config::DeliverySettings {
    cloudbrain::config::DeliverySettings {
        allowed: loopback(),
        timeout: Duration::from_secs(2),
        retry_for: Duration::from_secs(60),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
    }
}

/// Worker settings for tests: quick retries, short timeouts.
pub fn fast_settings() -> cloudbrain::config::WorkerSettings {
    cloudbrain::config::WorkerSettings {
        concurrency: 16,
        lease: Duration::from_secs(30),
        poll_interval: Duration::from_millis(100),
        max_attempts: 3,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        refresh_interval: Duration::from_millis(200),
        launch_timeout: Duration::from_secs(600),
        orphan_grace: Duration::ZERO,
    }
}

/// Runs `SELECT … AS v` returning one text value.
pub async fn text(conn: &mut AsyncPgConnection, sql: &str) -> Option<String> {
    #[derive(diesel::QueryableByName)]
    struct Text {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        v: Option<String>,
    }
    diesel::sql_query(sql)
        .get_result::<Text>(conn)
        .await
        .unwrap()
        .v
}

/// Runs SQL statements.
pub async fn exec(conn: &mut AsyncPgConnection, sql: &str) {
    diesel_async::SimpleAsyncConnection::batch_execute(conn, sql)
        .await
        .unwrap();
}

/// The broker under test: its own database, the API on loopback, the workers in this
/// process, the provider configs asked for and a client token. Made by [`TestBroker::new`].
pub struct TestBroker {
    pub db: TestDb,
    pub app: TestApp,
    pub token: String,
    pub workers: Workers,
}

/// What a [`TestBroker`] starts with.
pub struct TestBrokerBuilder {
    providers: Vec<(String, String, serde_json::Value)>,
    fake: Option<serde_json::Value>,
    settings: cloudbrain::config::WorkerSettings,
    api_only: bool,
}

impl TestBrokerBuilder {
    /// A provider config of `kind` named `name`.
    pub fn provider(mut self, kind: &str, name: &str, config: serde_json::Value) -> Self {
        self.providers.push((kind.into(), name.into(), config));
        self
    }

    /// The fake cloud as provider `fake`, its machines in the test's database so that every
    /// part of the test sees one cloud and [`TestBroker::machines`] can count them.
    pub fn fake(mut self, config: serde_json::Value) -> Self {
        self.fake = Some(config);
        self
    }

    /// The workers' settings (default: [`fast_settings`]).
    pub fn settings(mut self, settings: cloudbrain::config::WorkerSettings) -> Self {
        self.settings = settings;
        self
    }

    /// A test of the API alone: nothing runs the jobs its requests enqueue, so the jobs
    /// left at its end are not checked.
    pub fn api_only(mut self) -> Self {
        self.api_only = true;
        self
    }

    /// Starts it all; the test fails if it ends with a job queued or dead that it did not
    /// name with [`TestDb::ends_with_jobs`].
    pub async fn start(self) -> TestBroker {
        let db = TestDb::new().await;
        if !self.api_only {
            db.jobs_must_settle();
        }
        let app = TestApp::spawn(&db).await;
        if let Some(config) = self.fake {
            app.provider("fake", shared_store(config, &db.url)).await;
        }
        for (kind, name, config) in self.providers {
            app.provider_of(&kind, &name, config).await;
        }
        let token = app.token(Scope::Client).await;
        let workers = Workers::new(&db.url, self.settings);
        TestBroker {
            db,
            app,
            token,
            workers,
        }
    }
}

/// One job as the queue holds it.
#[derive(Debug, diesel::Queryable)]
pub struct JobRow {
    pub kind: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub locked_by: Option<String>,
}

impl TestBroker {
    /// A broker to be started with what the builder is given.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> TestBrokerBuilder {
        TestBrokerBuilder {
            providers: Vec::new(),
            fake: None,
            settings: fast_settings(),
            api_only: false,
        }
    }

    /// A client with the broker's client token.
    pub fn client(&self) -> Client<'_> {
        Client {
            app: &self.app,
            token: self.token.clone(),
        }
    }

    /// A client with a new token of `scope`.
    pub async fn client_with(&self, scope: Scope) -> Client<'_> {
        Client {
            app: &self.app,
            token: self.app.token(scope).await,
        }
    }

    /// Asks for an instance of `image` on provider `fake`; its id.
    pub async fn create(&self, image: &str) -> String {
        let created = self.app.create(&self.token, image).await;
        created["id"].as_str().unwrap().to_owned()
    }

    /// GET /instances/<id>: the body.
    pub async fn body(&self, id: &str) -> serde_json::Value {
        self.instance(id).await.1
    }

    /// GET /instances/<id>: the status.
    pub async fn status(&self, id: &str) -> u16 {
        self.instance(id).await.0
    }

    /// GET /instances/<id>/events: each move, (from, to), oldest first.
    pub async fn moves(&self, id: &str) -> Vec<(serde_json::Value, serde_json::Value)> {
        let path = format!("/instances/{id}/events");
        let events = self.client().get(&path).await.expect(200);
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["from_state"].clone(), e["to_state"].clone()))
            .collect()
    }

    /// The instance's jobs, oldest first, as the queue holds them.
    pub async fn jobs(&self, id: &str) -> Vec<JobRow> {
        let id = instance_id(id);
        let mut conn = self.db.conn().await;
        jobs::table
            .filter(jobs::instance_id.eq(id))
            .order(jobs::id)
            .select((
                jobs::kind,
                jobs::status,
                jobs::attempts,
                jobs::last_error,
                jobs::locked_by,
            ))
            .load(&mut conn)
            .await
            .unwrap()
    }

    /// The instance's job as one line: its status, last error and the attempts made (for
    /// an instance with one job).
    pub async fn job(&self, id: &str) -> (Option<String>, Option<String>, i64) {
        let jobs = self.jobs(id).await;
        let status = jobs.iter().map(|j| j.status.clone()).max();
        let error = jobs.iter().filter_map(|j| j.last_error.clone()).max();
        let attempts = jobs.iter().map(|j| i64::from(j.attempts)).sum();
        (status, error, attempts)
    }

    /// The instance's row.
    pub async fn row(&self, id: &str) -> cloudbrain::broker::model::Instance {
        let id = instance_id(id);
        let mut conn = self.db.conn().await;
        instances::table
            .find(id)
            .select(cloudbrain::broker::model::Instance::as_select())
            .first(&mut conn)
            .await
            .unwrap()
    }

    /// The states the instance went through, from its events.
    pub async fn states(&self, id: &str) -> Vec<String> {
        let path = format!("/instances/{id}/events");
        let events = self.app.get_json(&path, &self.token).await;
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["to_state"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Asserts the instance errored, its reason saying `why`.
    pub async fn assert_errored(&self, id: &str, why: &str) {
        let instance = self.body(id).await;
        assert_eq!(instance["state"], "errored", "{instance}");
        let reason = instance["error_reason"].as_str().unwrap_or_default();
        assert!(reason.contains(why), "{instance}");
    }

    /// A queue on this broker's database with a pool of `connections` of its own, for
    /// tests that claim and finish jobs by hand.
    pub fn queue(&self, connections: usize) -> cloudbrain::queue::Queue {
        cloudbrain::queue::Queue::new(
            db::pool(&self.db.url, connections, db::Statements::Prepared).unwrap(),
        )
    }

    /// Brings every scheduled retry due now. Tests that look at a job between its attempts
    /// use a backoff no run can outlast and call this, rather than racing a short backoff.
    pub async fn make_jobs_due(&self) {
        let mut conn = self.db.conn().await;
        diesel::update(jobs::table)
            .set(jobs::run_at.eq(diesel::dsl::now))
            .execute(&mut conn)
            .await
            .unwrap();
    }

    /// How many machines the fake cloud holds, for every provider name.
    pub async fn machines(&self) -> i64 {
        self.db.machines().await
    }

    /// GET /instances/<id>: the status and the body.
    pub async fn instance(&self, id: &str) -> (u16, serde_json::Value) {
        self.app.instance(&self.token, id).await
    }

    /// DELETE /instances/<id> with the broker's client token.
    pub async fn delete(&self, id: &str) -> Answer {
        self.client().delete(&format!("/instances/{id}")).await
    }

    /// Gives the instance back and runs the jobs: the status and body of a GET after.
    pub async fn delete_and_run_jobs(&self, id: &str) -> (u16, serde_json::Value) {
        self.delete(id).await.expect(200);
        self.workers.run_pending_jobs().await;
        self.instance(id).await
    }

    /// Runs jobs and refreshes until the instance reaches `state`.
    pub async fn settle(&self, id: &str, state: &str) -> serde_json::Value {
        for _ in 0..40 {
            self.workers.run_pending_jobs().await;
            self.workers.refresh.refresh_all().await;
            let (_, body) = self.instance(id).await;
            if body["state"] == state {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        panic!("{id} never reached {state}: {:?}", self.instance(id).await);
    }
}
