//! Behind PgBouncer in transaction mode: the pool's statements go through the pooler
//! unnamed, LISTEN and advisory locks go straight to Postgres
//! (`CLOUDBRAIN_DIRECT_DATABASE_URL`), and several http and worker processes share the
//! pooler's few server connections without losing or leaking anything.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{count, key, shared_store, wait_for, TestDb, KEY_HEX};
use cloudbrain::auth::{store, Scope};
use cloudbrain::broker::providers::insert_provider;
use cloudbrain::broker::State;
use cloudbrain::db::{self, Statements};
use diesel::sql_types::Integer;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde_json::json;

/// Debian's pgbouncer in transaction mode in front of the test's Postgres server, with
/// `server_connections` server connections per database: far fewer than its clients, so
/// consecutive transactions of one client land on different server connections. Started
/// by `cb_start_pgbouncer` (script/lib.sh), as `script/bench` starts it.
struct PgBouncer {
    pid: String,
    /// The pooler's URL for the test's database.
    url: String,
    /// Its config, its log and the logs of the processes behind it.
    dir: std::path::PathBuf,
}

impl PgBouncer {
    fn start(db: &TestDb, server_connections: usize) -> Self {
        let out = Command::new("bash")
            .args([
                "-c",
                ". script/lib.sh && cb_start_pgbouncer \"$1\" \"$2\" && \
                 printf '%s\\n' \"$CB_PGBOUNCER_URL\" \"$CB_PGBOUNCER_PID\" \"$CB_PGBOUNCER_DIR\"",
                "pgbouncer",
                &db.url,
                &server_connections.to_string(),
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "cb_start_pgbouncer failed");
        let out = String::from_utf8(out.stdout).unwrap();
        let mut lines = out.lines().map(str::to_owned);
        let (url, pid, dir) = (lines.next(), lines.next(), lines.next());
        Self {
            url: url.unwrap(),
            pid: pid.unwrap(),
            dir: dir.unwrap().into(),
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `n` statements with a bind through `pool`, 16 at a time; the errors they met.
async fn run_statements(pool: &db::Pool, n: i32) -> Vec<diesel::result::Error> {
    use futures_util::StreamExt;
    #[derive(diesel::QueryableByName)]
    struct Answer {
        #[diesel(sql_type = Integer)]
        n: i32,
    }
    futures_util::stream::iter(0..n)
        .map(|i| async move {
            let mut conn = pool.get().await.unwrap();
            let answer = diesel::sql_query("SELECT $1 + 1 AS n")
                .bind::<Integer, _>(i)
                .get_result::<Answer>(&mut conn)
                .await?;
            assert_eq!(answer.n, i + 1);
            Ok(())
        })
        .buffer_unordered(16)
        .filter_map(|result: Result<(), diesel::result::Error>| async move { result.err() })
        .collect()
        .await
}

#[tokio::test]
async fn named_statements_break_behind_a_transaction_pooler_and_unnamed_ones_do_not() {
    let db = TestDb::new().await;
    let bouncer = PgBouncer::start(&db, 2);

    // What a pool made for a direct connection meets here: the pooler really pools by
    // transaction, so the process test below proves something.
    let prepared = db::pool(&bouncer.url, 8, Statements::Prepared).unwrap();
    let errors = run_statements(&prepared, 300).await;
    assert!(
        !errors.is_empty() && errors.iter().all(db::statement_lost_by_pooler),
        "named statements survived transaction pooling, or failed otherwise: {errors:?}"
    );

    let unnamed = db::pool(&bouncer.url, 8, Statements::Unnamed).unwrap();
    let errors = run_statements(&unnamed, 300).await;
    assert!(errors.is_empty(), "{errors:?}");
}

/// Processes killed when dropped, so that a failing test leaves none behind.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `cloudbrain <role>` behind the pooler, logging to `<name>.log` beside its config.
fn process(
    name: &str,
    role: &str,
    db: &TestDb,
    bouncer: &PgBouncer,
    env: &[(&str, String)],
) -> Child {
    let log = std::fs::File::create(bouncer.dir.join(format!("{name}.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_cloudbrain"))
        .arg(role)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("DATABASE_URL", &bouncer.url)
        .env("CLOUDBRAIN_DIRECT_DATABASE_URL", &db.url)
        .env("CLOUDBRAIN_DATABASE_POOL_SIZE", "8")
        .env("CLOUDBRAIN_DATABASE_ENCRYPTION_KEY", KEY_HEX)
        .env("CLOUDBRAIN_JOB_LEASE", "2")
        .env("CLOUDBRAIN_WORKER_POLL_INTERVAL", "0.2")
        .env("CLOUDBRAIN_REFRESH_INTERVAL", "0.5")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn two_http_and_two_worker_processes_behind_pgbouncer_lose_nothing_when_a_worker_is_killed() {
    let db = TestDb::new().await;
    db.jobs_must_settle();
    let bouncer = PgBouncer::start(&db, 4);
    let token = {
        let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
        // Each create makes its machine at once and answers 300 ms later: a kill mid-run
        // leaves machines whose jobs never finished.
        let fake = json!({"create_latency_ms": 300, "boot_time_ms": 0, "max_concurrency": 64});
        insert_provider(
            &mut conn,
            &key(),
            "fake",
            "fake",
            &shared_store(fake, &db.url),
        )
        .await
        .unwrap();
        store::create_token(&mut conn, "pooler", Scope::Client)
            .await
            .unwrap()
            .to_string()
    };
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let mut children = Processes(
        ports
            .iter()
            .map(|port| {
                let addr = ("CLOUDBRAIN_ADDR", format!("127.0.0.1:{port}"));
                process(&format!("http-{port}"), "http", &db, &bouncer, &[addr])
            })
            .collect(),
    );
    let mut doomed = Processes(vec![process(
        "worker-1",
        "create-worker",
        &db,
        &bouncer,
        &[],
    )]);
    children
        .0
        .push(process("worker-2", "create-worker", &db, &bouncer, &[]));
    children
        .0
        .push(process("refresh", "refresh-worker", &db, &bouncer, &[]));
    let client = reqwest::Client::new();
    for port in &ports {
        wait_for("http to answer", Duration::from_secs(20), async || {
            client
                .get(format!("http://127.0.0.1:{port}/healthz"))
                .send()
                .await
                .is_ok()
        })
        .await;
    }

    // 200 POSTs, shared between the two http processes, 16 at a time.
    let post = |i: usize| {
        let (client, token) = (&client, &token);
        let port = ports[i % 2];
        async move {
            let answer = client
                .post(format!("http://127.0.0.1:{port}/instances"))
                .header("Authorization", format!("token {token}"))
                .json(&json!({"provider": "fake", "image": format!("image-{i}")}))
                .send()
                .await
                .unwrap();
            let status = answer.status();
            let body: serde_json::Value = answer.json().await.unwrap();
            assert_eq!(status, 200, "{body}");
            body["id"].as_str().unwrap().to_owned()
        }
    };
    use futures_util::StreamExt;
    let ids: Vec<String> = futures_util::stream::iter(0..200)
        .map(post)
        .buffer_unordered(16)
        .collect()
        .await;

    wait_for(
        "the workers to make some machines",
        Duration::from_secs(30),
        async || db.machines().await >= 20,
    )
    .await;
    // SIGKILL, while it holds leases.
    doomed.0[0].kill().unwrap();
    doomed.0[0].wait().unwrap();

    wait_for(
        "every acknowledged instance to run",
        Duration::from_secs(90),
        async || db.count_instances(Some(State::Running)).await == 200,
    )
    .await;
    let mut conn = db.conn().await;
    let listed = format!(
        "SELECT count(*) AS n FROM instances WHERE state = 'running' AND id::text IN ({})",
        ids.iter()
            .map(|id| format!("'{id}'"))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert_eq!(count(&mut conn, &listed).await, 200);
    assert_eq!(db.machines().await, 200, "a machine leaked or doubled");

    // Given back through both http processes: every machine goes.
    let deletes = futures_util::stream::iter(ids.iter().enumerate())
        .map(|(i, id)| {
            let (client, token) = (&client, &token);
            let port = ports[i % 2];
            async move {
                client
                    .delete(format!("http://127.0.0.1:{port}/instances/{id}"))
                    .header("Authorization", format!("token {token}"))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<u16>>()
        .await;
    assert!(deletes.iter().all(|s| *s == 200), "{deletes:?}");
    wait_for(
        "every machine to be removed",
        Duration::from_secs(60),
        async || {
            db.machines().await == 0 && db.count_instances(Some(State::Terminated)).await == 200
        },
    )
    .await;

    drop(children);
    let logs: String = std::fs::read_dir(&bouncer.dir)
        .unwrap()
        .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default())
        .collect();
    for symptom in ["does not exist", "already exists", "panicked"] {
        assert!(!logs.contains(symptom), "{symptom}: {logs}");
    }
}
