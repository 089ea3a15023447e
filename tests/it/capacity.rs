//! Capacity fallback: a create that finds no room moves to the next offering (another
//! zone, instance type or provider config), every worker skips the full one for a while,
//! and the instance's events say where it went.

use crate::common::TestBroker;
use cloudbrain::auth::Scope;
use serde_json::{json, Value};

async fn reasons(s: &TestBroker, id: &str) -> Vec<String> {
    let events = s
        .client()
        .get(&format!("/instances/{id}/events"))
        .await
        .expect(200);
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect()
}

async fn running(s: &TestBroker, id: &str) -> Value {
    s.workers.run_pending_jobs().await;
    s.workers.refresh.refresh_all().await;
    let body = s.body(id).await;
    assert_eq!(body["state"], "running", "{body}");
    body
}

#[tokio::test]
async fn a_full_zone_moves_the_create_to_the_next_and_every_worker_skips_it_after() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0, "zones": ["zone-a", "zone-b"], "no_capacity": ["@zone-a"]}))
        .start()
        .await;
    let first = s.create("ubuntu").await;
    let body = running(&s, &first).await;
    assert_eq!(body["placement"], "zone-b", "{body}");
    let moved = reasons(&s, &first).await;
    assert!(
        moved
            .iter()
            .any(|r| r.contains("placed on fake standard in zone-b")
                && r.contains("zone-a has no room")),
        "{moved:?}"
    );
    // The full zone is remembered in Postgres: the next instance, made by another worker
    // (nothing in memory shared), goes straight to zone-b.
    let second = s.create("ubuntu").await;
    let other = crate::common::Workers::new(&s.db.url, crate::common::fast_settings());
    other.run_pending_jobs().await;
    let body = running(&s, &second).await;
    assert_eq!(body["placement"], "zone-b", "{body}");
    let straight = reasons(&s, &second).await;
    assert!(
        !straight.iter().any(|r| r.contains("no room")),
        "{straight:?}"
    );
    assert_eq!(s.machines().await, 2);
}

#[tokio::test]
async fn a_pool_falls_back_through_its_list_and_keeps_counting_what_it_made() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0, "no_capacity": ["premium"]}))
        .provider(
            "fake",
            "spare",
            json!({"boot_time_ms": 0, "instance_types": ["large"], "no_capacity": ["large"]}),
        )
        .start()
        .await;
    let admin = s.client_with(Scope::Admin).await;
    let mut pool = json!({
        "provider": "fake", "image": "ubuntu", "instance_type": "premium",
        "min_idle": 2, "max_size": 4,
        "fallbacks": [{"provider": "spare", "instance_type": "large"}, {"instance_type": "standard"}],
    });
    let written = admin.put("/pools/ci", &pool).await.expect(200);
    assert_eq!(written["fallbacks"], pool["fallbacks"], "{written}");
    s.workers.refresh.reconcile_pools().await;
    s.workers.run_pending_jobs().await;
    s.workers.refresh.refresh_all().await;
    let status = s.client().get("/pools/ci").await.expect(200);
    assert_eq!(status["counts"]["idle"], 2, "{status}");
    // Both landed on the last offering, the pool's provider with the standard type.
    let taken = s
        .client()
        .post("/instances", &json!({"pool": "ci"}))
        .await
        .expect(200);
    assert_eq!(
        (taken["provider"].as_str(), taken["instance_type"].as_str()),
        (Some("fake"), Some("standard")),
        "{taken}"
    );

    // A fallback must name something that exists and is offered.
    for bad in [
        json!([{}]),
        json!([{"provider": "nowhere"}]),
        json!([{"instance_type": "huge"}]),
        json!([{"provider": "spare", "instance_type": "premium"}]),
        json!([{"instance_typo": "standard"}]),
        json!("standard"),
    ] {
        pool["fallbacks"] = bad.clone();
        let refused = admin.put("/pools/ci", &pool).await.expect(422);
        assert_eq!(refused["field"], "fallbacks", "{bad}: {refused}");
    }
    s.workers.run_pending_jobs().await;
}

#[tokio::test]
async fn with_every_offering_full_the_instance_errors_saying_so() {
    let s = TestBroker::new()
        .fake(json!({"zones": ["zone-a", "zone-b"], "no_capacity": ["standard"]}))
        .start()
        .await;
    s.db.ends_with_jobs(&["create dead"]);
    let id = s.create("ubuntu").await;
    for _ in 0..3 {
        s.make_jobs_due().await;
        s.workers.run_pending_jobs().await;
    }
    s.assert_errored(&id, "out of capacity").await;
    assert_eq!(s.machines().await, 0);
}

#[tokio::test]
async fn a_provider_config_bounds_its_instances_lives_and_falls_back_for_them() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .provider("fake", "spare", json!({"boot_time_ms": 0}))
        .start()
        .await;
    let admin = s.client_with(Scope::Admin).await;
    // The fake's config as it is stored, with a policy: an hour at most, then `spare`.
    let mut fleet = admin.get("/fleet").await.expect(200);
    fleet["providers"]["fake"]["max_lifetime_secs"] = json!(3600);
    fleet["providers"]["fake"]["fallbacks"] = json!([{"provider": "spare"}]);
    fleet["providers"]["fake"]["config"]["no_capacity"] = json!(["standard"]);
    let applied = admin.put("/fleet", &fleet).await.expect(200);
    assert_eq!(applied["applied"], true, "{applied}");
    let again = admin.put("/fleet", &fleet).await.expect(200);
    assert_eq!(
        again["applied"], false,
        "applied back, nothing changes: {again}"
    );
    let listed = s.client().get("/providers").await.expect(200);
    assert_eq!(
        listed["providers"][0]["max_lifetime_secs"], 3600,
        "{listed}"
    );

    // Its instances live an hour at most; asking for longer is refused, and so says the
    // document.
    let ask = |ttl: Value| json!({"provider": "fake", "image": "ubuntu", "ttl_seconds": ttl});
    let too_long = s.client().post("/instances", &ask(json!(3601))).await;
    assert_eq!(too_long.expect(422)["field"], "ttl_seconds");
    let doc = s.client().get("/openapi.json").await.expect(200);
    let branches = &doc["components"]["schemas"]["CreateInstanceBody"]["anyOf"];
    let fake = branches
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["properties"]["provider"]["const"] == "fake");
    assert_eq!(
        fake.unwrap()["properties"]["ttl_seconds"]["anyOf"][1]["maximum"],
        3600
    );
    let made = s
        .client()
        .post("/instances", &ask(Value::Null))
        .await
        .expect(200);
    let id = made["id"].as_str().unwrap().to_owned();
    let at =
        |b: &Value, f: &str| chrono::DateTime::parse_from_rfc3339(b[f].as_str().unwrap()).unwrap();
    assert_eq!(
        (at(&made, "expires_at") - at(&made, "created_at")).num_seconds(),
        3600
    );

    // `fake` has no room for it: it runs on `spare`.
    let body = running(&s, &id).await;
    assert_eq!(body["provider"], "spare", "{body}");
    assert!(
        reasons(&s, &id)
            .await
            .iter()
            .any(|r| r.contains("placed on spare standard")),
        "{body}"
    );
}
