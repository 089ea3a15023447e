//! Authentication over HTTP: both header forms, uniform refusals, the verified-token cache,
//! the throttle, revocation across processes, Cloud Brain's token rows, and outages.

use std::time::{Duration, Instant};

use crate::common::{TestApp, TestDb};
use base64::Engine;
use cloudbrain::auth::store::{revoke_token, Revoked};
use cloudbrain::auth::verifier::ScryptLimits;
use cloudbrain::auth::Scope;
use cloudbrain::config::Networks;
use cloudbrain::ids::TokenId;
use diesel_async::RunQueryDsl;
use serde_json::Value;

async fn status(app: &TestApp, authorization: Option<&str>) -> (u16, Value) {
    let mut request = app.client.get(app.url("/instances"));
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    let response = request.send().await.unwrap();
    let code = response.status().as_u16();
    if code == 401 {
        // A caller of the token scheme is challenged with it, so a browser's fetch does
        // not open a Basic login dialog; anyone else with Basic (httpie's .netrc).
        let token_scheme = authorization
            .and_then(|v| v.split_whitespace().next())
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("token"));
        let challenge = if token_scheme { "Token" } else { "Basic" };
        assert_eq!(
            response.headers()["www-authenticate"],
            format!("{challenge} realm=\"cloudbrain\"")
        );
    }
    (code, response.json().await.unwrap())
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test]
async fn token_and_basic_headers_authenticate_and_every_failure_looks_the_same() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;
    let token = app.token(Scope::Client).await;
    let revoked = app.token(Scope::Client).await;
    let revoked_id: i32 = revoked.split('-').next().unwrap().parse().unwrap();
    revoke_token(&mut db.conn().await, TokenId(revoked_id))
        .await
        .unwrap();

    assert_eq!(status(&app, Some(&format!("token {token}"))).await.0, 200);
    assert_eq!(status(&app, Some(&format!("Token {token}"))).await.0, 200);
    assert_eq!(status(&app, Some(&basic("token", &token))).await.0, 200);

    let (id, secret) = token.split_once('-').unwrap();
    let wrong_secret = format!(
        "{id}-{}",
        if secret.starts_with('0') {
            secret.replacen('0', "1", 1)
        } else {
            format!("0{}", &secret[1..])
        }
    );
    let failures = [
        None,
        Some("token".to_owned()),
        Some("token not-a-token".to_owned()),
        Some(format!("token 999999-{secret}")),
        Some(format!("token {wrong_secret}")),
        Some(format!("token {revoked}")),
        Some(basic("admin", &token)),
        Some(format!("Bearer {token}")),
    ];
    let mut bodies = Vec::new();
    for header in &failures {
        let (code, body) = status(&app, header.as_deref()).await;
        assert_eq!(code, 401, "{header:?}");
        bodies.push(body);
    }
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "refusals differ: {bodies:?}"
    );
    assert!(bodies[0]["errors"][0].as_str().unwrap().contains("token"));
}

#[tokio::test]
async fn scrypt_runs_once_per_token_and_never_for_unknown_ids() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;
    let token = app.token(Scope::Client).await;

    let requests = (0..20).map(|_| app.get("/instances", &token).send());
    for response in futures_util::future::join_all(requests).await {
        assert_eq!(response.unwrap().status(), 200);
    }
    let stats = app.verifier.stats();
    assert_eq!(stats.scrypt_runs, 1, "{stats:?}");
    assert_eq!(stats.cache_hits, 19, "{stats:?}");

    for id in 500..520 {
        let response = app
            .get(
                "/instances",
                &format!("{id}-00112233445566778899aabbccddeeff"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    }
    assert_eq!(
        app.verifier.stats().scrypt_runs,
        1,
        "unknown ids ran scrypt"
    );
}

/// A GET of /instances with `token`, as if from `address` behind a trusted proxy.
async fn from(app: &TestApp, address: &str, token: &str) -> reqwest::Response {
    app.get("/instances", token)
        .header("x-forwarded-for", address)
        .send()
        .await
        .unwrap()
}

/// The API behind a trusted proxy on loopback, so tests can speak from many addresses.
async fn behind_proxy(db: &TestDb, scrypt: ScryptLimits) -> TestApp {
    let trusted = Networks::parse("127.0.0.1, ::1").unwrap();
    TestApp::spawn_with(&db.url, trusted, scrypt).await
}

#[tokio::test]
async fn guessing_a_secret_is_throttled_without_scrypt_and_never_locks_out_the_holder() {
    let db = TestDb::new().await;
    let app = behind_proxy(&db, ScryptLimits::default()).await;
    let token = app.token(Scope::Client).await;
    let id = token.split('-').next().unwrap();
    let stranger = "203.0.113.9";
    for i in 0..10 {
        let guess = format!("{id}-{:032x}", i);
        assert_eq!(from(&app, stranger, &guess).await.status(), 401);
    }
    let runs = app.verifier.stats().scrypt_runs;
    assert_eq!(runs, 10);
    for i in 10..15 {
        let response = from(&app, stranger, &format!("{id}-{:032x}", i)).await;
        assert_eq!(response.status(), 429);
        let wait: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&wait), "{wait}");
        assert_eq!(
            response.json::<Value>().await.unwrap()["code"],
            "too_many_requests"
        );
    }
    assert_eq!(
        app.verifier.stats().scrypt_runs,
        runs,
        "throttled guesses ran scrypt"
    );
    // The holder of token N, elsewhere, is not locked out by a stranger's guesses, in a
    // process where N was never verified.
    assert_eq!(from(&app, "198.51.100.7", &token).await.status(), 200);
    // A client forging X-Forwarded-For through the proxy still lands on its own address.
    let forged = format!("198.51.100.7, {stranger}");
    assert_eq!(
        from(&app, &forged, &format!("{id}-{:032x}", 99))
            .await
            .status(),
        429
    );
}

#[tokio::test]
async fn concurrent_wrong_secrets_run_no_more_scrypt_than_the_throttle_allows() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;
    let token = app.token(Scope::Client).await;
    let id = token.split('-').next().unwrap().to_owned();
    let guesses = (0..48).map(|i| {
        let request = app.get("/instances", &format!("{id}-{i:032x}"));
        async move { request.send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(guesses).await;
    assert!(
        statuses.iter().all(|s| [401, 429, 503].contains(s)),
        "{statuses:?}"
    );
    let stats = app.verifier.stats();
    assert!(
        stats.scrypt_runs <= 10,
        "48 concurrent guesses ran {} hashes",
        stats.scrypt_runs
    );
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    assert!(stats.scrypt_peak <= cores, "{stats:?}");
}

#[tokio::test]
async fn many_right_tokens_verified_at_once_from_one_address_are_never_throttled() {
    let db = TestDb::new().await;
    let limits = ScryptLimits {
        concurrency: 2,
        wait: Duration::from_secs(30),
    };
    let app = TestApp::spawn_with(&db.url, Networks::default(), limits).await;
    let mut tokens = Vec::new();
    for _ in 0..16 {
        tokens.push(app.token(Scope::Client).await);
    }
    // A fleet behind one address starts at once: more first verifications than the
    // throttle allows failures, none of them wrong.
    let first = tokens.iter().map(|token| {
        let request = app.get("/instances", token);
        async move { request.send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(first).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(app.verifier.stats().scrypt_runs, 16);
}

#[tokio::test]
async fn scrypt_runs_at_most_k_at_once_and_the_rest_get_503_after_a_short_wait() {
    let db = TestDb::new().await;
    let limits = ScryptLimits {
        concurrency: 1,
        wait: Duration::from_millis(50),
    };
    let app = behind_proxy(&db, limits).await;
    let token = app.token(Scope::Client).await;
    let id = token.split('-').next().unwrap().to_owned();
    // Twenty strangers at once, each with an attempt left: only the bound holds them.
    let guesses = (0..20).map(|i| {
        let request = app
            .get("/instances", &format!("{id}-{i:032x}"))
            .header("x-forwarded-for", format!("203.0.113.{i}"));
        async move {
            let response = request.send().await.unwrap();
            let retry_after = response.headers().get("retry-after").is_some();
            (response.status().as_u16(), retry_after)
        }
    });
    let answers = futures_util::future::join_all(guesses).await;
    let busy = answers.iter().filter(|(s, _)| *s == 503).count();
    assert!(busy > 0, "{answers:?}");
    assert!(answers
        .iter()
        .all(|(s, retry)| *s == 401 || (*s == 503 && *retry)));
    let stats = app.verifier.stats();
    assert_eq!(stats.scrypt_peak, 1, "{stats:?}");
    assert_eq!(stats.scrypt_busy, busy as u64);
    // A refused guess gave its attempt back: the stranger may try again later.
    assert_eq!(from(&app, "203.0.113.0", &token).await.status(), 200);
}

#[tokio::test]
async fn an_admin_revokes_a_token_over_http_and_every_server_refuses_it_within_a_second() {
    let db = TestDb::new().await;
    let first = TestApp::spawn(&db).await;
    let second = TestApp::spawn(&db).await;
    first.listening().await;
    second.listening().await;
    let token = first.token(Scope::Client).await;
    let admin = first.client(&first.token(Scope::Admin).await);
    for app in [&first, &second] {
        for _ in 0..3 {
            assert_eq!(
                app.get("/instances", &token).send().await.unwrap().status(),
                200
            );
        }
        assert_eq!(app.verifier.stats().scrypt_runs, 1, "token not cached");
    }

    let id = token.split('-').next().unwrap();
    let revoked_at = Instant::now();
    let revoked = admin.delete(&format!("/tokens/{id}")).await.expect(200);
    assert_eq!(revoked["id"].to_string(), id);
    assert_eq!(revoked["scope"], "client");
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    for app in [&first, &second] {
        loop {
            let code = app.get("/instances", &token).send().await.unwrap().status();
            if code == 401 {
                break;
            }
            assert!(
                revoked_at.elapsed() < Duration::from_secs(1),
                "still accepted after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(1));

    // Again: the same answer, the same time of revocation.
    let again = admin.delete(&format!("/tokens/{id}")).await.expect(200);
    assert_eq!(again, revoked);
    let listed = admin.get("/tokens").await.expect(200);
    let row = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == revoked["id"]);
    assert_eq!(row, Some(&revoked));
    // The operator's command revokes the same way.
    let other = first.token(Scope::Client).await;
    let other_id: i32 = other.split('-').next().unwrap().parse().unwrap();
    let revoked = revoke_token(&mut db.conn().await, TokenId(other_id)).await;
    assert_eq!(revoked.unwrap(), Revoked::Now);
}

#[tokio::test]
async fn admins_list_tokens_without_their_secrets_and_clients_may_not_touch_them() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;
    let client_token = app.token(Scope::Client).await;
    let admin_token = app.token(Scope::Admin).await;
    let client = app.client(&client_token);
    let admin = app.client(&admin_token);

    let listed = admin.get("/tokens").await.expect(200);
    let tokens = listed["tokens"].as_array().unwrap();
    let ids: Vec<String> = tokens.iter().map(|t| t["id"].to_string()).collect();
    let id_of = |t: &str| t.split('-').next().unwrap().to_owned();
    assert_eq!(ids, [id_of(&client_token), id_of(&admin_token)]);
    assert_eq!(tokens[0]["scope"], "client");
    assert_eq!(tokens[1]["scope"], "admin");
    assert_eq!(tokens[1]["revoked_at"], Value::Null);
    let text = listed.to_string();
    for secret in [&client_token, &admin_token] {
        let secret = secret.split('-').nth(1).unwrap();
        assert!(!text.contains(secret), "a secret is shown: {text}");
    }
    let mut fields: Vec<&String> = tokens[0].as_object().unwrap().keys().collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "created_at",
            "description",
            "id",
            "last_used_at",
            "revoked_at",
            "scope"
        ]
    );

    let refused = client.get("/tokens").await.expect(403);
    assert_eq!(
        refused["errors"][0],
        "only an admin token may manage tokens"
    );
    let admin_id = id_of(&admin_token);
    client
        .delete(&format!("/tokens/{admin_id}"))
        .await
        .expect(403);
    admin.get("/tokens").await.expect(200);

    for (id, shown) in [
        ("999999", "999999"),
        ("abc", "abc"),
        ("-1", "-1"),
        ("99999999999", "99999999999"),
    ] {
        let missing = admin.delete(&format!("/tokens/{id}")).await.expect(404);
        assert_eq!(
            missing["errors"][0],
            format!("token {shown} does not exist")
        );
    }
    let wrong_method = app.post("/tokens", &admin_token).send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "GET");
}

#[tokio::test]
async fn a_cloud_brain_token_row_authenticates_unchanged() {
    // Computed independently with Python: hashlib.scrypt(bytes.fromhex(SECRET),
    // salt=bytes(range(100, 132)), n=16384, r=8, p=1, dklen=32).hex()
    const SECRET: &str = "00112233445566778899aabbccddeeff";
    const SALT: &str = "6465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f80818283";
    const HASH: &str = "eda113b32ef13c24e002de4669de1a66776be77acd4f7cbc4fcc7700cd41940f";
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;
    let mut conn = db.conn().await;
    diesel::sql_query(format!(
        "INSERT INTO auth_tokens (id, description, token_salt, token_hash) \
         VALUES (7001, 'from cloud brain', '\\x{SALT}', '\\x{HASH}')"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        app.get("/instances", &format!("7001-{SECRET}"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        app.get(
            "/instances",
            &format!("7001-{}", SECRET.replace("ff", "fe"))
        )
        .send()
        .await
        .unwrap()
        .status(),
        401
    );
}

#[tokio::test]
async fn last_used_is_written_once_a_minute_not_per_request() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;
    let token = app.token(Scope::Client).await;
    let id: i32 = token.split('-').next().unwrap().parse().unwrap();
    let last_used = || async {
        let mut conn = db.conn().await;
        cloudbrain::auth::store::find_token(&mut conn, TokenId(id))
            .await
            .unwrap()
            .unwrap()
            .last_used_at
    };
    assert_eq!(last_used().await, None);
    assert_eq!(
        app.get("/instances", &token).send().await.unwrap().status(),
        200
    );
    let mut first = None;
    for _ in 0..100 {
        first = last_used().await;
        if first.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(first.is_some(), "last_used_at never written");
    for _ in 0..5 {
        app.get("/instances", &token).send().await.unwrap();
    }
    // A second server (another process) must not write it again within the minute either.
    let second = TestApp::spawn(&db).await;
    second.get("/instances", &token).send().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(last_used().await, first);
}

#[tokio::test]
async fn a_database_outage_is_503_never_401() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = TestApp::spawn_on(&format!("postgres://nobody@127.0.0.1:{port}/gone")).await;
    assert_eq!(app.anonymous_status("/healthz").await, 200);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.json::<Value>().await.unwrap()["errors"].is_array());
    let response = app
        .get("/instances", "1-00112233445566778899aabbccddeeff")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "unavailable"
    );
}
