//! Pools over HTTP: admins write, scale and delete them; any token reads them with counts.

use crate::common::TestBroker;
use cloudbrain::auth::Scope;
use serde_json::{json, Value};

async fn setup() -> TestBroker {
    TestBroker::new()
        .fake(json!({"instance_types": ["standard", "premium"]}))
        .start()
        .await
}

fn spec() -> Value {
    json!({"provider": "fake", "image": "ubuntu", "min_idle": 2, "max_size": 5})
}

#[tokio::test]
async fn an_admin_writes_a_pool_and_every_token_reads_it_with_counts() {
    let s = setup().await;
    let admin = s.client_with(Scope::Admin).await;
    let made = admin.put("/pools/ci", &spec()).await.expect(200);
    assert_eq!(made["name"], "ci");
    assert_eq!(made["instance_type"], "standard", "the provider's default");
    assert_eq!(
        (made["min_idle"].clone(), made["max_size"].clone()),
        (json!(2), json!(5))
    );
    assert!(made["max_lifetime_secs"].is_null());
    let zero = json!({"idle": 0, "busy": 0, "starting": 0, "errored": 0, "expiring": 0});
    assert_eq!(made["counts"], zero);
    assert_eq!(made["last_errors"], json!([]));

    // A client reads pools but may not change them.
    let client = s.client();
    assert_eq!(client.get("/pools/ci").await.expect(200), made);
    let listed = client.get("/pools").await.expect(200);
    assert_eq!(listed["pools"], json!([made]));
    for refused in [
        client.put("/pools/ci", &spec()).await,
        client
            .post("/pools/ci/scale", &json!({"min_idle": 1}))
            .await,
        client.delete("/pools/ci").await,
    ] {
        let body = refused.expect(403);
        assert!(
            body["errors"][0].as_str().unwrap().contains("admin"),
            "{body}"
        );
    }

    // PUT again changes the shape; scale changes only min_idle.
    let mut premium = spec();
    premium["instance_type"] = json!("premium");
    premium["max_lifetime_secs"] = json!(3600);
    let changed = admin.put("/pools/ci", &premium).await.expect(200);
    assert_eq!(changed["instance_type"], "premium");
    assert_eq!(changed["max_lifetime_secs"], 3600);
    let scaled = admin
        .post("/pools/ci/scale", &json!({"min_idle": 4}))
        .await
        .expect(200);
    assert_eq!(scaled["min_idle"], 4);
    assert_eq!(scaled["instance_type"], "premium");

    let deleted = admin.delete("/pools/ci").await.expect(200);
    assert_eq!(deleted["name"], "ci");
    client.get("/pools/ci").await.expect(404);
    admin.delete("/pools/ci").await.expect(404);
    assert_eq!(client.get("/pools").await.expect(200)["pools"], json!([]));
}

#[tokio::test]
async fn a_bad_pool_is_refused_naming_the_field() {
    let s = setup().await;
    let admin = s.client_with(Scope::Admin).await;
    let with = |field: &str, value: Value| {
        let mut body = spec();
        body[field] = value;
        body
    };
    let cases = [
        ("ci", with("min_idle", json!(6)), "min_idle"),
        ("ci", with("max_size", json!(0)), "max_size"),
        ("ci", with("max_size", json!("five")), "max_size"),
        ("ci", with("min_idle", json!(-1)), "min_idle"),
        ("ci", with("provider", json!("nowhere")), "provider"),
        ("ci", with("instance_type", json!("gpu")), "instance_type"),
        ("ci", with("image", json!(" ")), "image"),
        (
            "ci",
            with("max_lifetime_secs", json!(0)),
            "max_lifetime_secs",
        ),
        (
            "ci",
            with("max_lifetime_secs", json!(10_801)),
            "max_lifetime_secs",
        ),
        ("-ci", spec(), "name"),
        ("ci%20pool", spec(), "name"),
    ];
    for (name, body, field) in cases {
        let refused = admin.put(&format!("/pools/{name}"), &body).await;
        let error = refused.expect(422);
        assert_eq!(error["field"], field, "{name} {body}: {error}");
    }
    let missing = json!({"provider": "fake", "image": "ubuntu"});
    let error = admin.put("/pools/ci", &missing).await.expect(422);
    assert_eq!(error["field"], "max_size");
    assert_eq!(
        s.client().get("/pools").await.expect(200)["pools"],
        json!([])
    );

    admin.put("/pools/ci", &spec()).await.expect(200);
    let over = admin.post("/pools/ci/scale", &json!({"min_idle": 6})).await;
    assert_eq!(over.expect(422)["field"], "min_idle");
    admin
        .post("/pools/ci/scale", &json!({"min_idle": 2.0}))
        .await
        .expect(200);
    // A name no pool can have names no pool.
    admin.delete("/pools/-not%20a%20name").await.expect(404);
    admin
        .post("/pools/-not%20a%20name/scale", &json!({"min_idle": 1}))
        .await
        .expect(404);
    let nowhere = admin
        .post("/pools/elsewhere/scale", &json!({"min_idle": 1}))
        .await;
    let error = nowhere.expect(404);
    assert!(
        error["errors"][0].as_str().unwrap().contains("elsewhere"),
        "{error}"
    );
}

/// A broker with pool `ci` (fake cloud, machines boot at once) of `min_idle` and
/// `max_size`, filled and booted.
async fn warm(min_idle: u32, max_size: u32) -> TestBroker {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    let admin = s.client_with(Scope::Admin).await;
    let body =
        json!({"provider": "fake", "image": "ubuntu", "min_idle": min_idle, "max_size": max_size});
    admin.put("/pools/ci", &body).await.expect(200);
    fill(&s).await;
    s
}

/// One pool cycle, the jobs it made and a refresh.
async fn fill(s: &TestBroker) {
    s.workers.refresh.reconcile_pools().await;
    s.workers.run_pending_jobs().await;
    s.workers.refresh.refresh_all().await;
}

async fn counts(s: &TestBroker) -> Value {
    s.client().get("/pools/ci").await.expect(200)["counts"].clone()
}

fn counted(idle: u32, busy: u32, starting: u32, expiring: u32) -> Value {
    json!({"idle": idle, "busy": busy, "starting": starting, "errored": 0, "expiring": expiring})
}

#[tokio::test]
async fn a_pooled_request_gets_a_running_machine_at_once_and_the_pool_refills() {
    let s = warm(2, 3).await;
    assert_eq!(counts(&s).await, counted(2, 0, 0, 0));
    assert_eq!(s.machines().await, 2);

    let taken = s
        .client()
        .post("/instances", &json!({"pool": "ci"}))
        .await
        .expect(200);
    assert_eq!(taken["state"], "running", "{taken}");
    assert!(taken["ip_address"].is_string(), "{taken}");
    assert_eq!(
        (taken["provider"].clone(), taken["image"].clone()),
        (json!("fake"), json!("ubuntu"))
    );
    let id = taken["id"].as_str().unwrap();
    assert_eq!(s.body(id).await, taken, "the first poll sees it running");
    let events = s
        .client()
        .get(&format!("/instances/{id}/events"))
        .await
        .expect(200);
    let last = events["events"].as_array().unwrap().last().unwrap().clone();
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .starts_with("taken from pool ci"),
        "{last}"
    );
    // Another token cannot see it; the pool counts it busy.
    let other = s.client_with(Scope::Client).await;
    other.get(&format!("/instances/{id}")).await.expect(404);
    assert_eq!(counts(&s).await, counted(1, 1, 0, 0));

    // A request naming the pool's shape instead of its name takes from it too: from the
    // pool of its instance type, not another pool of the same image listed first.
    let premium = json!({"provider": "fake", "image": "ubuntu", "instance_type": "premium",
        "min_idle": 0, "max_size": 1});
    let admin = s.client_with(Scope::Admin).await;
    admin.put("/pools/a-premium", &premium).await.expect(200);
    let shape = json!({"provider": "fake", "image": "ubuntu", "public_ssh_key": ""});
    let second = s.client().post("/instances", &shape).await.expect(200);
    assert_eq!(second["state"], "running", "{second}");
    assert_eq!(counts(&s).await, counted(0, 2, 0, 0));

    // One cycle refills within max_size: 2 busy, room for 1.
    fill(&s).await;
    assert_eq!(counts(&s).await, counted(1, 2, 0, 0));
    assert_eq!(s.machines().await, 3);

    // Given back, a pooled machine is destroyed like any other.
    s.delete_and_run_jobs(id).await;
    assert_eq!(s.status(id).await, 410);
}

#[tokio::test]
async fn with_no_idle_machine_a_request_goes_on_demand_and_a_full_pool_answers_429() {
    let s = warm(1, 2).await;
    let client = s.client();
    let warm = client
        .post("/instances", &json!({"pool": "ci"}))
        .await
        .expect(200);
    assert_eq!(warm["state"], "running");
    assert_eq!(counts(&s).await, counted(0, 1, 0, 0));
    // No idle machine left: one is made on demand, for the pool.
    let on_demand = client
        .post("/instances", &json!({"pool": "ci"}))
        .await
        .expect(200);
    assert_eq!(on_demand["state"], "creating");
    // Two live instances: the pool is full, and a cycle makes nothing.
    let answer = s
        .app
        .post("/instances", &s.token)
        .json(&json!({"pool": "ci"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 429);
    assert_eq!(answer.headers()["retry-after"], "5");
    let body: Value = answer.json().await.unwrap();
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains("pool \"ci\" is at its max_size of 2"),
        "{body}"
    );
    fill(&s).await;
    assert_eq!(counts(&s).await, counted(0, 2, 0, 0));

    let refused = [
        (json!({"pool": "nowhere"}), "pool"),
        (json!({"pool": "ci", "image": "debian"}), "image"),
        (json!({"pool": "ci", "provider": "other"}), "provider"),
        (json!({}), "provider"),
    ];
    for (body, field) in refused {
        let error = client.post("/instances", &body).await.expect(422);
        assert_eq!(error["field"], field, "{body}: {error}");
    }
}

#[tokio::test]
async fn concurrent_requests_never_share_a_machine_and_never_pass_max_size() {
    let s = warm(4, 6).await;
    let client = s.client();
    let body = json!({"pool": "ci"});
    let requests = (0..12).map(|_| client.post("/instances", &body));
    let answers = futures_util::future::join_all(requests).await;
    let mut states = std::collections::BTreeMap::<u16, Vec<Value>>::new();
    for answer in answers {
        states.entry(answer.status).or_default().push(answer.body);
    }
    let served = &states[&200];
    let ids: std::collections::HashSet<&str> =
        served.iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 6, "{states:?}");
    let running = served.iter().filter(|b| b["state"] == "running").count();
    assert_eq!(running, 4, "every idle machine served warm once");
    assert_eq!(states[&429].len(), 6);
    s.workers.run_pending_jobs().await;
    fill(&s).await;
    assert_eq!(counts(&s).await, counted(0, 6, 0, 0));
    assert_eq!(s.machines().await, 6);
}

#[tokio::test]
async fn scaling_in_retires_idle_machines_only_and_deleting_a_pool_drains_it() {
    let s = warm(3, 5).await;
    let admin = s.client_with(Scope::Admin).await;
    let taken = s
        .client()
        .post("/instances", &json!({"pool": "ci"}))
        .await
        .expect(200);
    let busy = taken["id"].as_str().unwrap();
    admin
        .post("/pools/ci/scale", &json!({"min_idle": 1}))
        .await
        .expect(200);
    s.workers.refresh.reconcile_pools().await;
    assert_eq!(counts(&s).await, counted(1, 1, 0, 1));
    s.workers.run_pending_jobs().await;
    s.workers.refresh.refresh_all().await;
    assert_eq!(counts(&s).await, counted(1, 1, 0, 0));

    admin.delete("/pools/ci").await.expect(200);
    s.workers.run_pending_jobs().await;
    assert_eq!(
        s.body(busy).await["state"],
        "running",
        "a client's machine stays"
    );
    assert_eq!(s.machines().await, 1);
}

#[tokio::test]
async fn a_pools_lifetime_bounds_its_machines_and_the_requests_for_them() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    let admin = s.client_with(Scope::Admin).await;
    let body = json!({"provider": "fake", "image": "ubuntu", "min_idle": 1, "max_size": 3, "max_lifetime_secs": 600});
    admin.put("/pools/ci", &body).await.expect(200);
    fill(&s).await;
    let lifetime = |b: &Value| {
        let at = |f: &str| chrono::DateTime::parse_from_rfc3339(b[f].as_str().unwrap()).unwrap();
        (at("expires_at") - at("created_at")).num_seconds()
    };
    let client = s.client();
    let warm = client
        .post("/instances", &json!({"pool": "ci"}))
        .await
        .expect(200);
    assert_eq!(lifetime(&warm), 600);
    // The document bounds a request for the pool as the server does.
    let doc = client.get("/openapi.json").await.expect(200);
    let branches = &doc["components"]["schemas"]["CreateInstanceBody"]["anyOf"];
    let pool = branches
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["required"] == json!(["pool"]));
    let pool = pool.expect("a branch for the pool");
    assert_eq!(
        pool["properties"]["ttl_seconds"]["anyOf"][1]["maximum"],
        600
    );
    assert_eq!(pool["properties"]["image"]["anyOf"][1]["const"], "ubuntu");
    let too_long = json!({"pool": "ci", "ttl_seconds": 601});
    assert_eq!(
        client.post("/instances", &too_long).await.expect(422)["field"],
        "ttl_seconds"
    );
    let short = client
        .post("/instances", &json!({"pool": "ci", "ttl_seconds": 60}))
        .await
        .expect(200);
    assert_eq!(
        lifetime(&short),
        60,
        "on demand, the pool being empty: {short}"
    );
    s.workers.run_pending_jobs().await;
}

/// The key the fake cloud let in on instance `id`'s machine.
async fn key_on(s: &TestBroker, id: &str) -> Option<String> {
    let mut conn = s.db.conn().await;
    let sql = format!("SELECT ssh_key AS v FROM fake_cloud.machines WHERE instance_id = '{id}'");
    crate::common::text(&mut conn, &sql).await
}

#[tokio::test]
async fn a_request_with_a_key_takes_a_warm_machine_once_its_key_is_on_it() {
    let s = warm(1, 3).await;
    let idle = s.workers.broker.pools().await.unwrap()[0].machines[0].id;
    let keyed = json!({"pool": "ci", "public_ssh_key": crate::common::ED25519});
    // The request waits while a key job puts its key on the warm machine.
    let client = s.client();
    let (taken, ()) = tokio::join!(client.post("/instances", &keyed), async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        s.workers.run_pending_jobs().await;
    });
    let taken = taken.expect(200);
    let id = taken["id"].as_str().unwrap().to_owned();
    assert_eq!(id, idle.to_string(), "the warm machine, not a new one");
    assert_eq!(taken["state"], "running", "{taken}");
    assert_eq!(
        key_on(&s, &id).await.as_deref(),
        Some(crate::common::ED25519)
    );
    assert_eq!(counts(&s).await, counted(0, 1, 0, 0));
    let events = s
        .client()
        .get(&format!("/instances/{id}/events"))
        .await
        .expect(200);
    let reasons: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    let n = reasons.len();
    assert!(
        reasons[n - 2].ends_with("its key is being put on the machine"),
        "{reasons:?}"
    );
    assert_eq!(reasons[n - 1], "the caller's key is on the machine");
    fill(&s).await;
}

#[tokio::test]
async fn where_keys_cannot_be_put_on_running_machines_a_keyed_request_goes_on_demand() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0, "authorize_keys": false}))
        .start()
        .await;
    let admin = s.client_with(Scope::Admin).await;
    let body = json!({"provider": "fake", "image": "ubuntu", "min_idle": 1, "max_size": 3});
    admin.put("/pools/ci", &body).await.expect(200);
    fill(&s).await;
    let keyed = json!({"pool": "ci", "public_ssh_key": crate::common::ED25519});
    let made = s.client().post("/instances", &keyed).await.expect(200);
    assert_eq!(made["state"], "creating", "{made}");
    assert_eq!(counts(&s).await["idle"], 1);
    s.workers.run_pending_jobs().await;
    let id = made["id"].as_str().unwrap();
    assert_eq!(
        key_on(&s, id).await.as_deref(),
        Some(crate::common::ED25519)
    );
    fill(&s).await;
}
