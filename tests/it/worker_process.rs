//! `cloudbrain create-worker` as separate processes: killed mid-job, stopped with SIGTERM,
//! woken by NOTIFY rather than a poll.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{count, wait_for, Jobs, TestBroker, TestDb, KEY_HEX};
use cloudbrain::broker::State;
use serde_json::json;

fn worker(db: &TestDb, lease: &str, poll: &str) -> Child {
    worker_with(db, lease, poll, &[])
}

fn worker_with(db: &TestDb, lease: &str, poll: &str, env: &[(&str, String)]) -> Child {
    role(db, "create-worker", lease, poll, env)
}

fn role(db: &TestDb, role: &str, lease: &str, poll: &str, env: &[(&str, String)]) -> Child {
    command(db, role)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("CLOUDBRAIN_JOB_LEASE", lease)
        .env("CLOUDBRAIN_WORKER_POLL_INTERVAL", poll)
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `cloudbrain ROLE` on `db`, logging warnings only, its standard output dropped.
fn command(db: &TestDb, role: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cloudbrain"));
    command
        .arg(role)
        .env("DATABASE_URL", &db.url)
        .env("CLOUDBRAIN_DATABASE_ENCRYPTION_KEY", KEY_HEX)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    command
}

/// A loopback address nothing listens on, for a worker's metrics server.
fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// A worker's `/metrics` text; `None` while it does not answer yet.
async fn metrics_of(addr: &str) -> Option<String> {
    let answer = reqwest::get(format!("http://{addr}/metrics")).await.ok()?;
    Some(answer.text().await.unwrap())
}

async fn setup(fake: serde_json::Value) -> TestBroker {
    TestBroker::new().fake(fake).start().await
}

#[tokio::test]
async fn a_worker_killed_mid_job_is_replaced_and_no_machine_doubles() {
    // Each create makes its machine at once and then takes 2 s to answer: a kill in that
    // window leaves machines whose jobs never finished.
    let s = setup(json!({"create_latency_ms": 2000, "boot_time_ms": 0})).await;
    let mut first = worker(&s.db, "1.5", "0.1");
    for i in 0..4 {
        s.create(&format!("image-{i}")).await;
    }
    wait_for(
        "the first worker to make the machines",
        Duration::from_secs(20),
        async || s.db.machines().await == 4,
    )
    .await;
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(s.db.count_instances(Some(State::Creating)).await, 4);

    let mut second = worker(&s.db, "1.5", "0.1");
    wait_for(
        "the second worker to finish the jobs",
        Duration::from_secs(30),
        async || s.db.count_instances(Some(State::Running)).await == 4,
    )
    .await;
    second.kill().unwrap();
    second.wait().unwrap();
    assert_eq!(
        s.db.machines().await,
        4,
        "a retried create made a second machine"
    );
    let mut conn = s.db.conn().await;
    let per_instance = count(&mut conn, "SELECT count(*) AS n FROM (SELECT instance_id FROM fake_cloud.machines GROUP BY instance_id HAVING count(*) > 1) d").await;
    assert_eq!(per_instance, 0);
    assert_eq!(s.db.count_jobs(Jobs::All).await, 0);
}

#[tokio::test]
async fn sigterm_lets_running_jobs_finish_and_claims_nothing_new() {
    let s = setup(json!({"create_latency_ms": 1000, "boot_time_ms": 0})).await;
    s.db.ends_with_jobs(&["create queued"]);
    let mut child = worker(&s.db, "20", "0.1");
    let first = s.create("ubuntu").await;
    wait_for(
        "the job to be claimed",
        Duration::from_secs(20),
        async || s.db.count_jobs(Jobs::Leased).await == 1,
    )
    .await;
    let stopped_at = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = s.create("ubuntu").await;
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(20),
        "did not exit within the lease"
    );
    assert_eq!(
        s.row(&first).await.state,
        State::Running,
        "the running job was cut off"
    );
    assert_eq!(s.row(&second).await.state, State::Creating);
    assert_eq!(s.db.count_jobs(Jobs::Leased).await, 0);
}

#[tokio::test]
async fn a_new_job_is_dispatched_without_waiting_for_a_poll() {
    let s = setup(json!({"boot_time_ms": 0})).await;
    // A poll once a minute: only NOTIFY can make this quick.
    let metrics_addr = free_addr();
    let mut child = worker_with(
        &s.db,
        "30",
        "60",
        &[("CLOUDBRAIN_METRICS_ADDR", metrics_addr.clone())],
    );
    // Let the worker start and run its first (empty) claim.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // What a Kubernetes probe asks of it.
    for probe in ["healthz", "readyz"] {
        let answer = reqwest::get(format!("http://{metrics_addr}/{probe}"))
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "/{probe}");
    }
    let id = s.create("ubuntu").await;
    wait_for(
        "the create job to run",
        Duration::from_secs(10),
        async || s.row(&id).await.state == State::Running,
    )
    .await;
    // The worker's own /metrics saw the job dispatched (it counts the job just after
    // recording its result, so give it a moment).
    let mut metrics = String::new();
    for _ in 0..40 {
        metrics = metrics_of(&metrics_addr).await.unwrap();
        if metrics.contains("outcome=\"done\"} 1\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        metrics.contains("cloudbrain_dispatch_latency_seconds_count 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cloudbrain_jobs_finished_total{kind=\"create\",outcome=\"done\"} 1\n"),
        "{metrics}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn a_burst_of_posts_wakes_the_worker_for_every_job_with_fewer_notifies_than_posts() {
    let s = setup(json!({"boot_time_ms": 0, "max_concurrency": 64})).await;
    use cloudbrain::db::listen::{listen_forever, Heard};
    use futures_util::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Counts what the workers hear, on a connection of the test's own.
    let heard = std::sync::Arc::new(AtomicUsize::new(0));
    let listening = std::sync::Arc::new(tokio::sync::Notify::new());
    let (counter, connected) = (heard.clone(), listening.clone());
    let listener = tokio::spawn(listen_forever(
        s.db.url.clone(),
        cloudbrain::queue::JOBS_CHANNEL,
        move |what| match what {
            Heard::Connected => connected.notify_one(),
            Heard::Payload(_) => {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            Heard::Disconnected => {}
        },
    ));
    listening.notified().await;
    // A poll once a minute: only announcements can wake it in time.
    let mut child = worker_with(&s.db, "30", "60", &[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let posts = 200;
    let client = s.client();
    futures_util::stream::iter(0..posts)
        .map(|i| {
            let client = &client;
            async move {
                let body = json!({"provider": "fake", "image": format!("i-{i}")});
                client.post("/instances", &body).await.expect(200)
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    wait_for(
        "every job of the burst to run, the last ones too",
        Duration::from_secs(30),
        async || s.db.count_instances(Some(State::Running)).await == posts,
    )
    .await;
    let heard = heard.load(Ordering::SeqCst);
    assert!(
        (1..posts as usize).contains(&heard),
        "{heard} NOTIFYs for {posts} POSTs"
    );
    listener.abort();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn a_refresh_worker_reports_how_long_its_cycles_take() {
    let s = setup(json!({"boot_time_ms": 0})).await;
    let addr = free_addr();
    let env = [
        ("CLOUDBRAIN_METRICS_ADDR", addr.clone()),
        ("CLOUDBRAIN_REFRESH_INTERVAL", "0.05".to_owned()),
    ];
    let mut child = role(&s.db, "refresh-worker", "5", "1", &env);
    let cycles = async || {
        let Some(text) = metrics_of(&addr).await else {
            return 0;
        };
        text.lines()
            .find_map(|l| l.strip_prefix("cloudbrain_refresh_cycle_seconds_count "))
            .map_or(0, |n| n.parse::<u64>().unwrap())
    };
    wait_for(
        "three refresh cycles counted",
        Duration::from_secs(10),
        async || cycles().await >= 3,
    )
    .await;
    let text = metrics_of(&addr).await.unwrap();
    assert!(
        text.contains("cloudbrain_refresh_cycle_seconds_bucket{le=\"+Inf\"}"),
        "{text}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn killing_the_pool_worker_mid_fill_ten_times_leaks_nothing_and_overshoots_nothing() {
    let s = setup(json!({"create_latency_ms": 50, "boot_time_ms": 0})).await;
    let admin = s.client_with(cloudbrain::auth::Scope::Admin).await;
    let pool = json!({"provider": "fake", "image": "ubuntu", "min_idle": 12, "max_size": 12});
    admin.put("/pools/ci", &pool).await.expect(200);
    let mut creator = worker(&s.db, "5", "0.05");
    let fast = [("CLOUDBRAIN_REFRESH_INTERVAL", "0.05".to_owned())];
    for kill in 0..10u64 {
        let mut pool_worker = role(&s.db, "refresh-worker", "5", "0.05", &fast);
        tokio::time::sleep(Duration::from_millis(40 + 23 * kill)).await;
        pool_worker.kill().unwrap();
        pool_worker.wait().unwrap();
        let live =
            s.db.count_in(vec![State::Creating, State::Starting, State::Running])
                .await;
        assert!(
            live <= 12,
            "{live} live instances in a pool of 12 after kill {kill}"
        );
    }
    let made = s.db.count_instances(None).await;
    assert!(made > 0, "the killed pool workers never filled the pool");
    let mut pool_worker = role(&s.db, "refresh-worker", "5", "0.05", &fast);
    wait_for("the pool to fill", Duration::from_secs(30), async || {
        let idle = s.client().get("/pools/ci").await.expect(200)["counts"]["idle"].clone();
        idle == 12
    })
    .await;
    pool_worker.kill().unwrap();
    pool_worker.wait().unwrap();
    creator.kill().unwrap();
    creator.wait().unwrap();
    assert_eq!(s.db.count_instances(Some(State::Running)).await, 12);
    assert_eq!(
        s.db.count_instances(None).await,
        12,
        "no instance beyond the pool's size"
    );
    assert_eq!(s.db.machines().await, 12, "no machine without its instance");
}

/// The first line of `role`'s log (run with `env` and no more) that says how many database
/// connections it pools.
fn pool_line(db: &TestDb, role: &str, env: &[(&str, &str)]) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = command(db, role)
        .envs(env.iter().copied())
        .env("CLOUDBRAIN_ADDR", free_addr())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let line = stderr
        .lines()
        .map_while(Result::ok)
        .find(|line| line.contains("database connections"));
    child.kill().unwrap();
    child.wait().unwrap();
    line.unwrap_or_else(|| panic!("{role} never said how many connections it pools"))
}

#[tokio::test]
async fn a_create_worker_pools_8_connections_and_the_others_16_unless_told() {
    let db = TestDb::new().await;
    for (role, env, connections) in [
        ("create-worker", &[][..], 8),
        ("http", &[][..], 16),
        ("refresh-worker", &[][..], 16),
        (
            "create-worker",
            &[("CLOUDBRAIN_DATABASE_POOL_SIZE", "3")][..],
            3,
        ),
        ("http", &[("CLOUDBRAIN_DATABASE_POOL_SIZE", "24")][..], 24),
    ] {
        let line = pool_line(&db, role, env);
        let said = format!("pooling up to {connections} database connections");
        assert!(line.contains(&said), "{role} {env:?}: {line}");
    }
}
