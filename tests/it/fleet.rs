//! The fleet over HTTP (admin): read back as a document, applied from YAML or JSON.

use crate::common::{Answer, TestBroker};
use cloudbrain::auth::Scope;
use serde_json::{json, Value};

async fn put(s: &TestBroker, token: &str, query: &str, body: &str, content_type: &str) -> Answer {
    let request = s
        .app
        .client
        .put(s.app.url(&format!("/fleet{query}")))
        .header("Authorization", format!("token {token}"))
        .header("content-type", content_type)
        .body(body.to_owned());
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    Answer {
        status,
        body: response.json().await.unwrap_or(Value::Null),
    }
}

#[tokio::test]
async fn an_admin_applies_a_fleet_document_and_reads_it_back_without_secrets() {
    let s = TestBroker::new()
        .fake(json!({"instance_types": ["standard", "premium"]}))
        .start()
        .await;
    let admin = s.client_with(Scope::Admin).await;
    let yaml = "pools:\n  ci:\n    provider: fake\n    image: ubuntu\n    min_idle: 0\n    max_size: 3\n    fallbacks:\n      - instance_type: premium\n";
    let dry = put(&s, &admin.token, "?dry_run=true", yaml, "application/yaml").await;
    let dry = dry.expect(200);
    assert_eq!(dry["applied"], false);
    assert_eq!(
        dry["changes"][0].as_str().unwrap().split(':').next(),
        Some("create pool ci")
    );
    s.client().get("/pools/ci").await.expect(404);
    let done = put(&s, &admin.token, "", yaml, "application/yaml")
        .await
        .expect(200);
    assert_eq!(done["applied"], true);
    s.client().get("/pools/ci").await.expect(200);

    // Read back: the fake's store (a secret field) is a reference, never the URL.
    let fleet = admin.get("/fleet").await.expect(200);
    let store = &fleet["providers"]["fake"]["config"]["store_url"];
    assert_eq!(
        store,
        &json!({"$env": "CLOUDBRAIN_FAKE_STORE_URL"}),
        "{fleet}"
    );
    assert!(!fleet.to_string().contains(&s.db.url));
    assert_eq!(fleet["pools"]["ci"]["max_size"], 3);
    assert_eq!(
        fleet["pools"]["ci"]["fallbacks"],
        json!([{"instance_type": "premium"}])
    );
    // Applied back as it was read, it changes nothing: the reference keeps the stored value.
    let again = put(
        &s,
        &admin.token,
        "?prune=true",
        &fleet.to_string(),
        "application/json",
    )
    .await;
    assert_eq!(again.expect(200), json!({"changes": [], "applied": false}));

    // Clients may not; bad documents name the field; a reference to nothing stored is refused.
    let client = put(&s, &s.token, "", yaml, "application/yaml").await;
    client.expect(403);
    admin.get("/fleet").await.expect(200);
    s.client().get("/fleet").await.expect(403);
    let cases = [
        (
            "pools:\n  ci:\n    provider: fake\n    image: ubuntu\n    max_size: 0\n",
            "pools.ci.max_size",
        ),
        (
            "pools:\n  ci:\n    image: ubuntu\n    max_size: 2\n",
            "pools.ci",
        ),
        (
            "providers:\n  other:\n    type: fake\n    config:\n      store_url: {$env: HOME}\n",
            "providers.other.config.store_url",
        ),
    ];
    for (doc, field) in cases {
        let refused = put(&s, &admin.token, "", doc, "application/yaml")
            .await
            .expect(422);
        assert_eq!(refused["field"], field, "{doc}: {refused}");
        assert!(
            refused["errors"][0].as_str().unwrap().contains("line "),
            "{refused}"
        );
    }
    put(&s, &admin.token, "", yaml, "text/plain")
        .await
        .expect(415);
    s.client().get("/pools").await.expect(200);
}

#[tokio::test]
async fn an_empty_document_is_refused_and_json_is_read_as_json() {
    let s = TestBroker::new().fake(json!({})).start().await;
    let admin = s.client_with(Scope::Admin).await;
    let yaml = "pools:\n  ci:\n    provider: fake\n    image: ubuntu\n    max_size: 2\n";
    put(&s, &admin.token, "", yaml, "application/yaml")
        .await
        .expect(200);
    // An empty body with prune would delete everything: it is refused, nothing changes.
    for empty in ["", "\n  \n"] {
        let refused = put(&s, &admin.token, "?prune=true", empty, "application/yaml").await;
        let refused = refused.expect(422);
        assert!(
            refused["errors"][0].as_str().unwrap().contains("empty"),
            "{refused}"
        );
    }
    s.client().get("/pools/ci").await.expect(200);
    // JSON's escapes (a surrogate pair here) and integers written 2.0 read as JSON does.
    let json = r#"{"pools": {"ci": {"provider": "fake", "image": "ubuntu-\ud83d\ude80", "max_size": 2.0}}}"#;
    let done = put(&s, &admin.token, "", json, "application/json").await;
    assert_eq!(done.expect(200)["applied"], true);
    let pool = s.client().get("/pools/ci").await.expect(200);
    assert_eq!(pool["image"], "ubuntu-\u{1f680}", "{pool}");
    // A client's document is refused for who sent it, before it is read.
    let client = put(&s, &s.token, "", "''", "application/yaml").await;
    client.expect(403);
}
