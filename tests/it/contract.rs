//! The provider contract, one suite for every cloud: the fake cloud, EC2 on moto_server and
//! GCE on the fake Compute API each pass the same checks of what `Provider` promises (an
//! idempotent create, a list of only its own machines, an idempotent destroy) and of an
//! instance's life through the broker (running, gone, a retried create, an orphan).

use std::sync::Arc;

use cloudbrain::auth::Scope;
use cloudbrain::providers::catalog;
use cloudbrain_provider::{InstanceSpec, Provider, ProviderError};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::fake_compute::FakeCompute;
use crate::common::{machine_ids as ids, shared_store, TestBroker, TestDb};
use crate::ec2::Moto;

/// One cloud under test, and what a provider config for it looks like.
enum Cloud {
    /// The fake cloud, its machines in a database of their own so that every provider
    /// built for it sees one cloud.
    Fake(TestDb),
    Ec2(Moto),
    Gce(FakeCompute),
}

impl Cloud {
    async fn start(kind: &str) -> Self {
        match kind {
            "fake" => Cloud::Fake(TestDb::new().await),
            "ec2" => Cloud::Ec2(Moto::start(&[])),
            _ => Cloud::Gce(FakeCompute::start()),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Cloud::Fake(_) => "fake",
            Cloud::Ec2(_) => "ec2",
            Cloud::Gce(_) => "gce",
        }
    }

    /// An image the cloud boots.
    fn image(&self) -> &'static str {
        match self {
            Cloud::Fake(_) => "ubuntu",
            Cloud::Ec2(_) => "ami-12c6146b",
            Cloud::Gce(_) => "default",
        }
    }

    async fn config(&self) -> Value {
        match self {
            Cloud::Fake(store) => shared_store(json!({"boot_time_ms": 0}), &store.url),
            Cloud::Ec2(moto) => moto.config(json!({})).await,
            Cloud::Gce(fake) => crate::gce::config(fake, json!({})),
        }
    }

    /// A provider named `name` on this cloud, built through the catalog.
    async fn provider(&self, name: &str, config: &Value) -> Arc<dyn Provider> {
        catalog::find(self.kind())
            .unwrap()
            .build(name, config)
            .await
            .unwrap()
    }

    /// The broker with this cloud registered as a provider named after its kind.
    async fn broker(&self, config: &Value) -> TestBroker {
        TestBroker::new()
            .provider(self.kind(), self.kind(), config.clone())
            .start()
            .await
    }

    fn spec(&self) -> InstanceSpec {
        InstanceSpec {
            image: self.image().into(),
            instance_type: "standard".into(),
            public_ssh_key: Some(crate::common::ED25519.into()),
            placement: None,
        }
    }
}

async fn a_create_is_idempotent_and_get_reads_it(cloud: Cloud) {
    let config = cloud.config().await;
    let provider = cloud.provider("contract", &config).await;
    let id = Uuid::new_v4();
    let first = provider.create(id, &cloud.spec()).await.unwrap();
    let again = provider.create(id, &cloud.spec()).await.unwrap();
    assert_eq!(first.id, id);
    assert_eq!(again.upstream_id, first.upstream_id, "a second machine");
    assert_eq!(provider.get(id).await.unwrap().id, id);
    assert_eq!(ids(provider.as_ref()).await, [id]);
    assert_eq!(
        provider.get(Uuid::new_v4()).await,
        Err(ProviderError::NotFound)
    );
}

async fn a_list_holds_only_this_configs_machines(cloud: Cloud) {
    let config = cloud.config().await;
    let ours = cloud.provider("contract", &config).await;
    let theirs = cloud.provider("someone-else", &config).await;
    let mut made = Vec::new();
    for _ in 0..3 {
        let id = Uuid::new_v4();
        ours.create(id, &cloud.spec()).await.unwrap();
        made.push(id);
    }
    let other = Uuid::new_v4();
    theirs.create(other, &cloud.spec()).await.unwrap();
    made.sort();
    assert_eq!(ids(ours.as_ref()).await, made);
    assert_eq!(ids(theirs.as_ref()).await, [other]);
}

async fn a_destroy_is_idempotent(cloud: Cloud) {
    let config = cloud.config().await;
    let provider = cloud.provider("contract", &config).await;
    let id = Uuid::new_v4();
    provider.create(id, &cloud.spec()).await.unwrap();
    provider.destroy(id).await.unwrap();
    provider.destroy(id).await.unwrap();
    provider.destroy(Uuid::new_v4()).await.unwrap();
    assert_eq!(provider.get(id).await, Err(ProviderError::NotFound));
    assert!(ids(provider.as_ref()).await.is_empty());
}

async fn an_instance_runs_and_is_gone_after_delete(cloud: Cloud) {
    let config = cloud.config().await;
    let b = cloud.broker(&config).await;
    let asked = json!({"provider": cloud.kind(), "image": cloud.image(), "instance_type": "default", "public_ssh_key": crate::common::ED25519});
    let client = b.client();
    let created = client.post("/instances", &asked).await.expect(200);
    let id = created["id"].as_str().unwrap().to_owned();
    let running = b.settle(&id, "running").await;
    assert_eq!(running["instance_type"], "standard", "{running}");
    assert!(running["ip_address"].is_string(), "{running}");
    assert!(running["upstream_id"].is_string(), "{running}");
    let path = format!("/instances/{id}");
    let admin = b.client_with(Scope::Admin).await;
    assert_eq!(
        admin.get(&path).await.expect(200),
        running,
        "admins see it too"
    );

    let terminating = client.delete(&path).await.expect(200);
    assert_eq!(terminating["state"], "terminating");
    b.workers.run_pending_jobs().await;
    let gone = client.get(&path).await.expect(410);
    assert_eq!(gone["state"], "terminated");
    let provider = cloud.provider(cloud.kind(), &config).await;
    assert!(ids(provider.as_ref()).await.is_empty(), "a machine is left");
}

async fn a_retried_create_finds_the_first_machine(cloud: Cloud) {
    let config = cloud.config().await;
    let b = cloud.broker(&config).await;
    let id = b.app.create_on(&b.token, cloud.kind(), cloud.image()).await;
    // A worker made the machine and died before recording it: its job is still queued.
    let dead_worker = cloud.provider(cloud.kind(), &config).await;
    let uuid = Uuid::parse_str(&id).unwrap();
    dead_worker.create(uuid, &cloud.spec()).await.unwrap();
    b.settle(&id, "running").await;
    assert_eq!(
        ids(dead_worker.as_ref()).await,
        [uuid],
        "the retried create made a second machine"
    );
}

async fn a_machine_without_an_instance_is_destroyed_and_owned_ones_kept(cloud: Cloud) {
    let config = cloud.config().await;
    let b = cloud.broker(&config).await;
    let kept = b.app.create_on(&b.token, cloud.kind(), cloud.image()).await;
    b.settle(&kept, "running").await;
    let provider = cloud.provider(cloud.kind(), &config).await;
    let orphan = Uuid::new_v4();
    provider.create(orphan, &cloud.spec()).await.unwrap();
    let reports = b.workers.refresh.refresh_all().await;
    assert_eq!(reports[0].1.destroyed_orphans, 1, "{reports:?}");
    assert_eq!(
        ids(provider.as_ref()).await,
        [Uuid::parse_str(&kept).unwrap()]
    );
    assert_eq!(b.instance(&kept).await.1["state"], "running");
}

/// Runs `checks` against the cloud of kind `cloud`, one test each.
macro_rules! checks {
    ($cloud:ident: $($check:ident),*) => {
        mod $cloud {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $check() {
                    super::$check(Cloud::start(stringify!($cloud)).await).await;
                }
            )*
        }
    };
}

/// Runs every check of the contract against the cloud of each kind named.
macro_rules! contract {
    ($($cloud:ident),*) => {$(
        checks!($cloud:
            a_create_is_idempotent_and_get_reads_it,
            a_list_holds_only_this_configs_machines,
            a_destroy_is_idempotent,
            an_instance_runs_and_is_gone_after_delete,
            a_retried_create_finds_the_first_machine,
            a_machine_without_an_instance_is_destroyed_and_owned_ones_kept
        );
    )*};
}

contract!(fake, ec2, gce);
