//! The GCE provider through the official client against a stateful fake of the Compute
//! API on loopback, whose response shapes are checked against Google's discovery document
//! and libcloud's recorded Compute responses.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::common::fake_compute::{FakeCompute, Inject};
use crate::common::{machine_ids, TestBroker, ED25519};
use cloudbrain_provider::{InstanceSpec, Provider, ProviderError};
use cloudbrain_provider_gce::{GceConfig, GceProvider};
use serde_json::{json, Value};
use uuid::Uuid;

pub(crate) fn config(fake: &FakeCompute, extra: Value) -> Value {
    let mut config = json!({
        "project": "cloudbrain-test",
        "zones": ["us-central1-a", "us-central1-b"],
        "machine_types": {"standard": "e2-standard-2", "premium": "c3-standard-8"},
        "image": "projects/debian-cloud/global/images/debian-12-bookworm-v20261101",
        "endpoint": fake.url,
        "credentials": {"type": "anonymous"},
        "operation_poll_ms": 10,
        "operation_timeout_secs": 10,
        "public_ip": true,
        "tags": ["ci"],
        "labels": {"team": "ci"},
    });
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    config
}

/// The broker with a `gce` provider config pointing at `fake`.
async fn broker(fake: &FakeCompute, extra: Value) -> TestBroker {
    let config = config(fake, extra);
    TestBroker::new()
        .provider("gce", "gce", config)
        .start()
        .await
}

async fn provider(fake: &FakeCompute, name: &str, extra: Value) -> GceProvider {
    GceProvider::new(name, GceConfig::parse(&config(fake, extra)).unwrap())
        .await
        .unwrap()
}

fn spec() -> InstanceSpec {
    InstanceSpec {
        image: "default".into(),
        instance_type: "standard".into(),
        public_ssh_key: Some(ED25519.into()),
        placement: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gce_vm_goes_from_request_to_running_to_terminated() {
    let fake = FakeCompute::start();
    let b = broker(&fake, json!({})).await;
    let response = b
        .app
        .post("/instances", &b.token)
        .json(&json!({"provider": "gce", "image": "default", "instance_type": "default", "public_ssh_key": ED25519}))
        .send()
        .await
        .unwrap();
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let running = b.settle(&id, "running").await;
    assert!(
        running["ip_address"]
            .as_str()
            .unwrap()
            .starts_with("203.0.113."),
        "{running}"
    );

    let vms = fake.vms_in("us-central1-a");
    assert_eq!(vms.len(), 1);
    let vm = &vms[0];
    assert_eq!(vm["name"], format!("cloudbrain-{id}"));
    assert_eq!(vm["labels"]["cloudbrain-instance-id"], id.as_str());
    assert_eq!(vm["labels"]["cloudbrain-provider"], "gce");
    assert_eq!(vm["labels"]["team"], "ci");
    assert!(vm["machineType"]
        .as_str()
        .unwrap()
        .ends_with("/zones/us-central1-a/machineTypes/e2-standard-2"));
    let items = vm["metadata"]["items"].as_array().unwrap();
    assert_eq!(
        items.len(),
        1,
        "only ssh-keys, no startup script: {items:?}"
    );
    assert_eq!(items[0]["key"], "ssh-keys");
    assert_eq!(items[0]["value"], format!("cloudbrain:{ED25519}"));
    assert!(
        vm.get("serviceAccounts")
            .is_none_or(|a| a.as_array().unwrap().is_empty()),
        "no service account by default"
    );
    assert_eq!(vm["tags"]["items"], json!(["ci"]));

    assert_eq!(b.delete_and_run_jobs(&id).await.0, 410);
    assert_eq!(fake.vm_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_create_adopts_the_first_vm() {
    let fake = FakeCompute::start();
    let b = broker(&fake, json!({})).await;
    let id = b.app.create_on(&b.token, "gce", "default").await;
    // A worker inserted the VM and died before recording it.
    provider(&fake, "gce", json!({}))
        .await
        .create(Uuid::parse_str(&id).unwrap(), &spec())
        .await
        .unwrap();
    b.settle(&id, "running").await;
    assert_eq!(fake.vm_count(), 1, "the retried create made a second VM");
    // The same requestId returns the same operation, and an insert of our own name is adoption.
    let again = provider(&fake, "gce", json!({})).await;
    let machine = again
        .create(Uuid::parse_str(&id).unwrap(), &spec())
        .await
        .unwrap();
    assert_eq!(machine.id.to_string(), id);
    assert_eq!(fake.vm_count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_reads_every_page_of_every_zone_and_only_ours() {
    let fake = FakeCompute::start();
    let in_a = provider(&fake, "gce", json!({"zones": ["us-central1-a"]})).await;
    let in_b = provider(&fake, "gce", json!({"zones": ["us-central1-b"]})).await;
    let other = provider(&fake, "someone-else", json!({})).await;
    let mut made = Vec::new();
    for (p, n) in [(&in_a, 5), (&in_b, 3)] {
        for _ in 0..n {
            let id = Uuid::new_v4();
            p.create(id, &spec()).await.unwrap();
            made.push(id);
        }
    }
    other.create(Uuid::new_v4(), &spec()).await.unwrap();
    let both = provider(&fake, "gce", json!({"page_size": 2})).await;
    made.sort();
    assert_eq!(machine_ids(&both).await, made);
    let pages = fake
        .state
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.starts_with("LIST"))
        .count();
    assert!(
        pages >= 3 + 2,
        "{pages} list calls: paging was not exercised"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_api_error_maps_to_its_kind() {
    let fake = FakeCompute::start();
    let p = provider(&fake, "gce", json!({"zones": ["us-central1-a"]})).await;
    for (inject, expected) in [
        (Inject::RateLimit, "throttled"),
        (Inject::ServerError, "transient"),
        (Inject::BadRequest, "invalid"),
        (Inject::Quota, "capacity"),
        (Inject::Exhausted, "capacity"),
    ] {
        fake.inject("us-central1-a", inject, 1);
        let err = p.create(Uuid::new_v4(), &spec()).await.unwrap_err();
        let kind = match err {
            ProviderError::Throttled { .. } => "throttled",
            ProviderError::Transient(_) => "transient",
            ProviderError::Invalid(_) => "invalid",
            ProviderError::Capacity(_) => "capacity",
            ProviderError::NotFound => "not found",
        };
        assert_eq!(kind, expected, "{inject:?}");
    }
    assert_eq!(fake.vm_count(), 0);
    p.destroy(Uuid::new_v4()).await.unwrap();
    assert_eq!(p.get(Uuid::new_v4()).await, Err(ProviderError::NotFound));
    let bad_family = InstanceSpec {
        image: "no-such-family".into(),
        ..spec()
    };
    assert!(
        matches!(p.create(Uuid::new_v4(), &bad_family).await, Err(ProviderError::Invalid(m)) if m.contains("no-such-family"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_family_resolves_to_its_image() {
    let fake = FakeCompute::start();
    fake.state
        .lock()
        .unwrap()
        .families
        .insert("ci-runner".into(), "ci-runner-v7".into());
    let p = provider(&fake, "gce", json!({"image": "ci-runner"})).await;
    p.create(Uuid::new_v4(), &spec()).await.unwrap();
    let requests = fake.state.lock().unwrap().requests.clone();
    let images: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("IMAGE "))
        .collect();
    assert_eq!(images.len(), 1, "{requests:?}");
    assert!(
        images[0].ends_with("/global/images/ci-runner-v7"),
        "{images:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exhausted_zone_moves_the_create_to_the_next_zone_and_is_skipped_after() {
    let fake = FakeCompute::start();
    fake.inject("us-central1-a", Inject::Exhausted, 1);
    let b = broker(&fake, json!({})).await;
    let id = b.app.create_on(&b.token, "gce", "default").await;
    let running = b.settle(&id, "running").await;
    assert_eq!(running["placement"], "us-central1-b", "{running}");
    assert_eq!(fake.vms_in("us-central1-a").len(), 0);
    assert_eq!(fake.vms_in("us-central1-b").len(), 1);
    // Every worker skips the exhausted zone for a while: the next VM goes straight to b.
    let next = b.app.create_on(&b.token, "gce", "default").await;
    b.settle(&next, "running").await;
    let inserts_in_a = fake
        .state
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.starts_with("POST ") && r.contains("us-central1-a/"))
        .count();
    assert_eq!(inserts_in_a, 1);
    assert_eq!(fake.vms_in("us-central1-b").len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_preempted_vm_errors_its_instance_and_is_destroyed() {
    let fake = FakeCompute::start();
    let b = broker(&fake, json!({"preemptible": true})).await;
    let id = b.app.create_on(&b.token, "gce", "default").await;
    b.settle(&id, "running").await;
    assert_eq!(
        fake.vms_in("us-central1-a")[0]["scheduling"]["preemptible"],
        true
    );
    fake.set_status(&format!("cloudbrain-{id}"), "TERMINATED");
    let errored = b.settle(&id, "errored").await;
    assert!(
        errored["error_reason"]
            .as_str()
            .unwrap()
            .contains("preempted"),
        "{errored}"
    );
    assert_eq!(fake.vm_count(), 0, "the stopped VM was left behind");
}

/// Where the Python packages with Google's discovery document and libcloud's recordings are.
fn python_package(module: &str) -> PathBuf {
    let python = std::env::var("CLOUDBRAIN_VENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| format!("{}/.venv/bin/python", env!("CARGO_MANIFEST_DIR")));
    let out = Command::new(&python)
        .args([
            "-c",
            &format!("import os, {module}; print(os.path.dirname({module}.__file__))"),
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{python}: {e}; script/test installs apache-libcloud and google-api-python-client"
            )
        });
    assert!(
        out.status.success(),
        "{module} is not installed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks every field of `value` against discovery schema `schema`, recursively.
fn check_schema(
    value: &Value,
    schema: &Value,
    schemas: &Value,
    path: &str,
    problems: &mut Vec<String>,
) {
    let schema = match schema.get("$ref").and_then(|r| r.as_str()) {
        Some(name) => &schemas[name],
        None => schema,
    };
    let expected = schema["type"].as_str().unwrap_or("object");
    let ok = matches!(
        (expected, value),
        ("string", Value::String(_))
            | ("boolean", Value::Bool(_))
            | ("array", Value::Array(_))
            | ("object", Value::Object(_))
            | ("integer" | "number", Value::Number(_))
    );
    if !ok {
        problems.push(format!(
            "{path}: {} where the schema says {expected}",
            json_type(value)
        ));
        return;
    }
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_schema(
                    item,
                    &schema["items"],
                    schemas,
                    &format!("{path}[{i}]"),
                    problems,
                );
            }
        }
        Value::Object(fields) => {
            for (key, field) in fields {
                let field_schema = match schema.get("properties").and_then(|p| p.get(key)) {
                    Some(s) => s,
                    None => match schema.get("additionalProperties") {
                        Some(s) => s,
                        None => {
                            problems.push(format!("{path}.{key}: not in the discovery schema"));
                            continue;
                        }
                    },
                };
                check_schema(
                    field,
                    field_schema,
                    schemas,
                    &format!("{path}.{key}"),
                    problems,
                );
            }
        }
        _ => {}
    }
}

/// Checks `ours` against a recorded Google response: the recorded fields in `required` are
/// all there, and every field both have is of the same JSON type.
fn check_recorded(
    ours: &Value,
    recorded: &Value,
    required: &[&str],
    what: &str,
    problems: &mut Vec<String>,
) {
    for key in required {
        assert!(
            recorded.get(*key).is_some(),
            "the recording of {what} lacks {key}"
        );
        if ours.get(*key).is_none() {
            problems.push(format!(
                "{what}.{key}: in Google's recorded response, missing from the fake's"
            ));
        }
    }
    for (key, value) in ours.as_object().unwrap() {
        if let Some(theirs) = recorded.get(key) {
            if json_type(theirs) != json_type(value) {
                problems.push(format!(
                    "{what}.{key}: {} where Google sent {}",
                    json_type(value),
                    json_type(theirs)
                ));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fake_answers_in_the_shapes_google_does() {
    let discovery: Value = serde_json::from_str(
        &std::fs::read_to_string(
            python_package("googleapiclient").join("discovery_cache/documents/compute.v1.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let schemas = &discovery["schemas"];
    let fixtures = python_package("libcloud").join("test/compute/fixtures/gce");
    let recorded = |name: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixtures.join(name)).unwrap()).unwrap()
    };

    let fake = FakeCompute::start();
    let p = provider(&fake, "gce", json!({"service_account": "ci@p.iam.gserviceaccount.com", "scopes": ["https://www.googleapis.com/auth/devstorage.read_only"]})).await;
    let id = Uuid::new_v4();
    p.create(id, &spec()).await.unwrap();
    // Its metadata as setMetadata leaves it is checked too.
    p.authorize_key(id, ED25519).await.unwrap();
    let client = reqwest::Client::new();
    let base = format!(
        "{}/compute/v1/projects/cloudbrain-test/zones/us-central1-a",
        fake.url
    );
    let get = |url: String| {
        let client = client.clone();
        async move {
            client
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let instance = get(format!("{base}/instances/cloudbrain-{id}")).await;
    let list = get(format!("{base}/instances")).await;
    // Inserts `body` and polls its operation three times (PENDING -> RUNNING -> DONE).
    let insert_and_poll = |query: String, body: Value| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let op: Value = client
                .post(format!("{base}/instances{query}"))
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let mut polled = Value::Null;
            for _ in 0..3 {
                polled = get(format!(
                    "{base}/operations/{}",
                    op["name"].as_str().unwrap()
                ))
                .await;
            }
            (op, polled)
        }
    };
    let (insert_op, polled) = insert_and_poll(
        format!("?requestId={}", Uuid::new_v4()),
        json!({"name": "shape-check", "machineType": "zones/us-central1-a/machineTypes/e2-small", "labels": {"a": "b"}}),
    )
    .await;
    fake.inject("us-central1-a", Inject::Quota, 1);
    let (_, failed) = insert_and_poll(String::new(), json!({"name": "quota-check"})).await;
    assert_eq!(polled["status"], "DONE");
    assert_eq!(failed["error"]["errors"][0]["code"], "QUOTA_EXCEEDED");

    let mut problems = Vec::new();
    check_schema(
        &instance,
        &json!({"$ref": "Instance"}),
        schemas,
        "Instance",
        &mut problems,
    );
    check_schema(
        &list,
        &json!({"$ref": "InstanceList"}),
        schemas,
        "InstanceList",
        &mut problems,
    );
    for (name, op) in [
        ("insert", &insert_op),
        ("done", &polled),
        ("failed", &failed),
    ] {
        check_schema(
            op,
            &json!({"$ref": "Operation"}),
            schemas,
            &format!("Operation({name})"),
            &mut problems,
        );
    }
    check_recorded(
        &instance,
        &recorded("zones_us-central1-a_instances_node-name.json"),
        &[
            "kind",
            "id",
            "name",
            "status",
            "zone",
            "selfLink",
            "creationTimestamp",
            "machineType",
            "networkInterfaces",
            "disks",
            "metadata",
            "tags",
            "scheduling",
            "canIpForward",
        ],
        "Instance",
        &mut problems,
    );
    check_recorded(
        &list,
        &recorded("zones_us-central1-a_instances.json"),
        &["kind", "id", "items", "selfLink"],
        "InstanceList",
        &mut problems,
    );
    for (name, op) in [("insert", &insert_op), ("done", &polled)] {
        check_recorded(
            op,
            &recorded("operations_operation_zones_us-central1-a_instances_post.json"),
            &[
                "kind",
                "id",
                "name",
                "zone",
                "operationType",
                "targetLink",
                "targetId",
                "status",
                "user",
                "progress",
                "insertTime",
                "selfLink",
            ],
            &format!("Operation({name})"),
            &mut problems,
        );
    }
    check_recorded(
        &polled,
        &recorded("operations_operation_zones_us-central1-a_instances_post.json"),
        &["startTime", "endTime"],
        "Operation(done)",
        &mut problems,
    );
    assert!(
        problems.is_empty(),
        "the fake strays from Google's shapes:\n{}",
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_with_a_key_takes_a_warm_vm_and_the_key_goes_into_its_metadata() {
    let fake = FakeCompute::start();
    let b = broker(&fake, json!({})).await;
    let admin = b.client_with(cloudbrain::auth::Scope::Admin).await;
    let pool = json!({"provider": "gce", "image": "default", "min_idle": 1, "max_size": 2});
    admin.put("/pools/warm", &pool).await.expect(200);
    b.workers.refresh.reconcile_pools().await;
    b.workers.run_pending_jobs().await;
    crate::common::wait_for("the warm VM", Duration::from_secs(20), async || {
        b.workers.refresh.refresh_all().await;
        b.client().get("/pools/warm").await.expect(200)["counts"]["idle"] == 1
    })
    .await;
    let keyed = json!({"pool": "warm", "public_ssh_key": ED25519});
    let client = b.client();
    let (taken, ()) = tokio::join!(client.post("/instances", &keyed), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.workers.run_pending_jobs().await;
    });
    let taken = taken.expect(200);
    assert_eq!(taken["state"], "running", "{taken}");
    let vm = &fake.vms_in("us-central1-a")[0];
    let items = vm["metadata"]["items"].as_array().unwrap();
    let keys = items.iter().find(|i| i["key"] == "ssh-keys").unwrap();
    assert!(
        keys["value"]
            .as_str()
            .unwrap()
            .ends_with(ED25519.trim_end()),
        "{vm}"
    );
    let asked = fake.state.lock().unwrap().requests.clone();
    assert!(
        asked.iter().any(|r| r.starts_with("SETMETADATA ")),
        "{asked:?}"
    );
    b.workers.refresh.reconcile_pools().await;
    b.workers.run_pending_jobs().await;
}
