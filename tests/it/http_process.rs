//! `cloudbrain http` as a separate process: where it listens, what it logs, how it stops.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{TestApp, TestDb, KEY_HEX};
use cloudbrain::auth::Scope;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_http(db: &TestDb, port: u16) -> Child {
    start_http_logging(db, port, "json")
}

fn start_http_logging(db: &TestDb, port: u16, format: &str) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_cloudbrain"))
        .arg("http")
        .env("DATABASE_URL", &db.url)
        .env("CLOUDBRAIN_ADDR", format!("127.0.0.1:{port}"))
        .env("CLOUDBRAIN_DATABASE_ENCRYPTION_KEY", KEY_HEX)
        .env("CLOUDBRAIN_LOG_FORMAT", format)
        .env("CLOUDBRAIN_SHUTDOWN_TIMEOUT", "10")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "http never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn raw_request(port: u16, request: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Stops the process with SIGTERM, checks it exited cleanly, and returns its log.
fn stop_and_read_logs(child: &mut Child) -> String {
    sigterm(child);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    logs
}

#[tokio::test]
async fn logs_carry_the_request_id_and_never_the_token() {
    let db = TestDb::new().await;
    let helper = TestApp::spawn(&db).await;
    let token = helper.token(Scope::Client).await;
    let port = free_port();
    let mut child = start_http(&db, port);
    let response = raw_request(
        port,
        &format!("GET /instances HTTP/1.1\r\nHost: x\r\nAuthorization: token {token}\r\nX-Request-ID: trace-me-42\r\nConnection: close\r\n\r\n"),
    );
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response
        .to_ascii_lowercase()
        .contains("x-request-id: trace-me-42"));
    let logs = stop_and_read_logs(&mut child);
    let secret = token.split_once('-').unwrap().1;
    assert!(!logs.contains(secret), "the token's secret was logged");
    let tagged: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .filter(|l: &serde_json::Value| l.to_string().contains("trace-me-42"))
        .collect();
    assert!(
        !tagged.is_empty(),
        "no log line names the request id:\n{logs}"
    );
    assert!(tagged.iter().any(|l| l["status"] == 200), "{tagged:?}");
}

#[tokio::test]
async fn text_logs_to_a_pipe_carry_no_terminal_colours() {
    let db = TestDb::new().await;
    let port = free_port();
    let mut child = start_http_logging(&db, port, "text");
    let response = raw_request(
        port,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let logs = stop_and_read_logs(&mut child);
    assert!(logs.contains("request finished"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "ANSI escapes in a log file: {logs:?}"
    );
}

#[tokio::test]
async fn sigterm_drains_a_request_in_flight() {
    let db = TestDb::new().await;
    let helper = TestApp::spawn(&db).await;
    helper.provider("fake", serde_json::json!(null)).await;
    let token = helper.token(Scope::Client).await;
    let port = free_port();
    let mut child = start_http(&db, port);

    let body = r#"{"provider": "fake", "image": "ubuntu"}"#;
    let (head, tail) = body.split_at(10);
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "POST /instances HTTP/1.1\r\nHost: x\r\nAuthorization: token {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{head}",
        body.len()
    )
    .unwrap();
    stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    sigterm(&child);
    std::thread::sleep(Duration::from_millis(300));
    stream.write_all(tail.as_bytes()).unwrap();
    let mut status_line = String::new();
    BufReader::new(&stream).read_line(&mut status_line).unwrap();
    assert!(
        status_line.starts_with("HTTP/1.1 200"),
        "in-flight request lost: {status_line:?}"
    );
    assert!(child.wait().unwrap().success());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening after shutdown"
    );
}

#[tokio::test]
async fn sigterm_ends_open_event_streams_with_a_reason_and_does_not_wait_for_them() {
    let db = TestDb::new().await;
    let helper = TestApp::spawn(&db).await;
    let token = helper.token(Scope::Client).await;
    let port = free_port();
    let mut child = start_http(&db, port);

    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET /stream/instances HTTP/1.1\r\nHost: x\r\nAuthorization: token {token}\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(&stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line:?}");

    let stopping = Instant::now();
    sigterm(&child);
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("event: closed") && rest.contains("the server is shutting down"),
        "{rest}"
    );
    assert!(child.wait().unwrap().success());
    // CLOUDBRAIN_SHUTDOWN_TIMEOUT is 10 s: an open stream does not hold the drain.
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopping.elapsed()
    );
}
