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
    let nowhere = admin
        .post("/pools/elsewhere/scale", &json!({"min_idle": 1}))
        .await;
    let error = nowhere.expect(404);
    assert!(
        error["errors"][0].as_str().unwrap().contains("elsewhere"),
        "{error}"
    );
}
