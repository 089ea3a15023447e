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
