//! End to end, as a user: `cloudbrain dev` in its own process on its own throwaway
//! database, driven with the real httpie through `script/cloud-brain` and a real ~/.netrc.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::TempDir;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use serde_json::Value;

struct Dev {
    child: Child,
    url: String,
    token: String,
    database: String,
    /// The httpie request it prints to paste.
    try_httpie: String,
    /// The curl request it prints to paste.
    try_curl: String,
    /// The curl request it prints for each pool of its fleet file.
    pool_curls: Vec<String>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        // A failed test still stops dev, so its throwaway database is removed.
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
    }
}

fn start_dev(args: &[&str]) -> Dev {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudbrain"))
        .arg("dev")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("DATABASE_URL")
        .env_remove("CLOUDBRAIN_DATABASE_ENCRYPTION_KEY")
        .env("CLOUDBRAIN_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut url, mut token, mut database) = (None, None, None);
    let (mut try_httpie, mut try_curl, mut pool_curls) = (None, None, Vec::new());
    loop {
        let line = lines
            .next()
            .expect("cloudbrain dev ended before saying how it stops")
            .unwrap();
        if line.starts_with("Ctrl-C") {
            break;
        }
        if line.starts_with(' ') && line.contains("\"pool\"") {
            pool_curls.push(line.trim().to_owned());
        }
        let field = |name: &str| line.strip_prefix(name).map(|v| v.trim().to_owned());
        url = url.or(field("url:"));
        token = token.or(field("token:"));
        database = database.or(field("database:"));
        try_httpie = try_httpie.or(field("try:"));
        try_curl = try_curl.or(field("or:"));
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Dev {
        child,
        url: url.unwrap(),
        token: token.unwrap(),
        database: database.unwrap(),
        try_httpie: try_httpie.unwrap(),
        try_curl: try_curl.unwrap(),
        pool_curls,
    }
}

fn cloud_brain(home: &Path, url: &str, args: &[&str]) -> (Output, Value) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("script/cloud-brain");
    let output = Command::new(script)
        .args(args)
        .env("HOME", home)
        .env("CLOUDBRAIN_URL", url)
        .output()
        .unwrap();
    let body = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (output, body)
}

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What `line`, printed by dev, answers when pasted into a shell that has only the
/// system's PATH.
fn pasted(line: &str, home: &Path) -> Value {
    let output = Command::new("bash")
        .arg("-c")
        .arg(line)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", home)
        .output()
        .unwrap();
    assert!(output.status.success(), "{line}: {output:?}");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("{line}: {}", String::from_utf8_lossy(&output.stdout)))
}

fn home_with_netrc(token: Option<&str>) -> TempDir {
    let dir = TempDir::new("cloudbrain-home");
    let home = dir.path();
    if let Some(token) = token {
        let netrc = home.join(".netrc");
        std::fs::write(
            &netrc,
            format!("machine 127.0.0.1\n  login token\n  password {token}\n"),
        )
        .unwrap();
        Command::new("chmod")
            .arg("600")
            .arg(&netrc)
            .status()
            .unwrap();
    }
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_and_the_httpie_helper_take_an_instance_from_request_to_terminated() {
    let mut dev = start_dev(&[]);
    let home_dir = home_with_netrc(Some(&dev.token));
    let home = home_dir.path();

    let (output, created) = cloud_brain(
        home,
        &dev.url,
        &["post", "instances", "provider=fake", "image=ubuntu-24.04"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(created["state"], "creating");
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("instances/{id}");

    wait_for("running", Duration::from_secs(30), || {
        cloud_brain(home, &dev.url, &["get", &path]).1["state"] == "running"
    });
    let (_, running) = cloud_brain(home, &dev.url, &["get", &path]);
    assert!(
        running["ip_address"].is_string() && running["upstream_id"].is_string(),
        "{running}"
    );

    let (output, deleting) = cloud_brain(home, &dev.url, &["delete", &path]);
    assert!(output.status.success());
    assert!(
        ["terminating", "terminated"].contains(&deleting["state"].as_str().unwrap()),
        "{deleting}"
    );
    wait_for("terminated", Duration::from_secs(30), || {
        let (output, body) = cloud_brain(home, &dev.url, &["get", &path]);
        // httpie's --check-status exits 4 on the 410 that a terminated instance answers.
        output.status.code() == Some(4) && body["state"] == "terminated"
    });

    let machines = crate::common::fake_machines(&dev.database).await;
    assert_eq!(machines, 0, "the fake cloud still holds a machine");

    // The requests it prints work as pasted into a shell that has only the system's PATH.
    for line in [&dev.try_httpie, &dev.try_curl] {
        let body = pasted(line, home);
        assert_eq!(body["state"], "creating", "{line}: {body}");
    }

    // The README's API example runs as written, with its TOKEN, against this server.
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let example = readme
        .split("```sh\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap())
        .find(|block| block.contains("Idempotency-Key: build-8812"))
        .expect("the README's API example");
    let work = TempDir::new("cloudbrain-readme");
    let output = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(example.replace("http://127.0.0.1:42191", &dev.url))
        .current_dir(work.path())
        .env("TOKEN", &dev.token)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8_lossy(&output.stdout);
    for expected in [
        r#""state":"creating""#,
        r#""instances":["#,
        r#""to_state":"creating""#,
        r#""state":"terminating""#,
    ] {
        assert!(printed.contains(expected), "{expected} not in {printed}");
    }

    // Without a .netrc entry the helper says what to do, and sends nothing.
    let bare = home_with_netrc(None);
    let (output, _) = cloud_brain(bare.path(), &dev.url, &["get", "instances"]);
    assert_eq!(output.status.code(), Some(2));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("machine 127.0.0.1 login token password"),
        "{message}"
    );

    assert!(Command::new("kill")
        .args(["-TERM", &dev.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = dev.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        AsyncPgConnection::establish(&dev.database).await.is_err(),
        "the throwaway database outlived dev"
    );
}

#[tokio::test]
async fn dev_from_the_sample_fleet_file_hands_out_a_warm_machine_at_once() {
    let dev = start_dev(&["-f", "examples/fleet.yaml"]);
    let home = home_with_netrc(Some(&dev.token));
    let home = home.path();
    let idle = || cloud_brain(home, &dev.url, &["get", "pools/ci"]).1["counts"]["idle"] == 2;
    wait_for("pool ci filled", Duration::from_secs(30), idle);
    // The request it prints for the pool gets a machine already running.
    assert_eq!(dev.pool_curls.len(), 1, "{:?}", dev.pool_curls);
    let body = pasted(&dev.pool_curls[0], home);
    assert_eq!(body["state"], "running", "{body}");
    assert!(body["ip_address"].is_string(), "{body}");
    // It expires as the file says: an hour after it was made.
    let at =
        |field: &str| chrono::DateTime::parse_from_rfc3339(body[field].as_str().unwrap()).unwrap();
    assert_eq!((at("expires_at") - at("created_at")).num_seconds(), 3600);
    // The pool boots a replacement.
    wait_for("pool ci refilled", Duration::from_secs(30), idle);
    let (_, pool) = cloud_brain(home, &dev.url, &["get", "pools/ci"]);
    assert_eq!(pool["counts"]["busy"], 1, "{pool}");
}
