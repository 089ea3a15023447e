//! The EC2 provider against moto_server (the AWS API emulator from PyPI), started per test
//! on a free loopback port, and against a canned endpoint for errors moto cannot make.
//! Nothing here reaches beyond loopback: the endpoint, credentials and region are fixed.

use std::io::{BufRead, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{machine_ids, TestBroker, ED25519};
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use base64::Engine;
use cloudbrain::broker::State;
use cloudbrain_provider::{InstanceSpec, Provider, ProviderError};
use cloudbrain_provider_ec2::{Ec2Config, Ec2Provider};
use serde_json::{json, Value};
use uuid::Uuid;

pub(crate) struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    pub(crate) fn start(env: &[(&str, &str)]) -> Self {
        // SAFETY of the environment: tests set only this variable, to the same value.
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        let program = std::env::var("MOTO_SERVER")
            .unwrap_or_else(|_| format!("{}/.venv/bin/moto_server", env!("CARGO_MANIFEST_DIR")));
        // Port 0: the server binds a free port itself and says which, so two tests never
        // race for one (a port picked here and released could be taken meanwhile).
        let mut child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .envs(env.iter().copied())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {program} ({e}); script/test installs moto into .venv")
            });
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("moto_server ended before saying where it listens")
                .unwrap();
            if let Some(at) = line.find("http://127.0.0.1:") {
                break line[at..].trim().to_owned();
            }
        };
        // It logs every request there: keep reading so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { child, url }
    }

    async fn clients(&self) -> (aws_sdk_ec2::Client, aws_sdk_ecs::Client) {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(&self.url)
            .credentials_provider(aws_credential_types::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .load()
            .await;
        (
            aws_sdk_ec2::Client::new(&shared),
            aws_sdk_ecs::Client::new(&shared),
        )
    }

    /// A provider config pointing at this server, with a fresh subnet.
    pub(crate) async fn config(&self, extra: Value) -> Value {
        let (ec2, _) = self.clients().await;
        let vpc = ec2
            .create_vpc()
            .cidr_block("10.9.0.0/16")
            .send()
            .await
            .unwrap();
        let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_owned();
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block("10.9.1.0/24")
            .send()
            .await
            .unwrap();
        let mut config = json!({
            "region": "us-east-1",
            "endpoint_url": self.url,
            "access_key_id": "testing",
            "secret_access_key": "testing",
            "subnet_ids": [subnet.subnet().unwrap().subnet_id().unwrap()],
            "instance_types": {"standard": "t3.medium", "premium": "c6i.xlarge"},
            "image": "ami-12c6146b",
            "image_owners": ["self"],
            "tags": {"team": "ci"},
        });
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        config
    }

    /// The broker with an `ec2` provider config pointing at this server.
    async fn broker(&self, extra: Value) -> TestBroker {
        let config = self.config(extra).await;
        TestBroker::new()
            .provider("ec2", "ec2", config)
            .start()
            .await
    }

    /// ECS cluster `builds`, and the broker with an `ec2` config whose machines join it
    /// (and `extra`).
    async fn with_cluster(&self, extra: Value) -> (aws_sdk_ecs::Client, TestBroker) {
        let (_, ecs) = self.clients().await;
        ecs.create_cluster()
            .cluster_name("builds")
            .send()
            .await
            .unwrap();
        let mut config = json!({"ecs_cluster": "builds"});
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        (ecs, self.broker(config).await)
    }

    async fn provider(&self, name: &str, config: &Value) -> Ec2Provider {
        Ec2Provider::new(name, Ec2Config::parse(config).unwrap()).await
    }

    /// An instance's cloud-init user data, decoded.
    async fn user_data(&self, upstream: &str) -> String {
        let (ec2, _) = self.clients().await;
        let attribute = ec2
            .describe_instance_attribute()
            .instance_id(upstream)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .unwrap();
        let encoded = attribute.user_data().and_then(|v| v.value()).unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        String::from_utf8(decoded).unwrap()
    }

    /// EC2 instances carrying our instance-id tag, in any state, with their states.
    async fn machines(&self, id: &str) -> Vec<InstanceStateName> {
        self.described(id)
            .await
            .iter()
            .filter_map(|i| i.state().and_then(|s| s.name()).cloned())
            .collect()
    }

    /// The EC2 instances tagged with instance id `id`.
    async fn described(&self, id: &str) -> Vec<aws_sdk_ec2::types::Instance> {
        let (ec2, _) = self.clients().await;
        let out = ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:cloudbrain:instance-id")
                    .values(id)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .cloned()
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spec(image: &str) -> InstanceSpec {
    InstanceSpec {
        image: image.into(),
        instance_type: "standard".into(),
        public_ssh_key: Some(ED25519.into()),
        placement: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ec2_instance_goes_from_request_to_running_to_terminated() {
    let moto = Moto::start(&[]);
    let b = moto.broker(json!({})).await;
    let asked = json!({"provider": "ec2", "image": "ami-12c6146b", "instance_type": "default", "public_ssh_key": ED25519});
    let created = b.client().post("/instances", &asked).await.expect(200);
    let id = created["id"].as_str().unwrap().to_owned();
    b.workers.run_pending_jobs().await;
    b.workers.refresh.refresh_all().await;
    let (_, running) = b.instance(&id).await;
    assert_eq!(running["state"], "running", "{running}");
    let upstream = running["upstream_id"].as_str().unwrap().to_owned();
    assert!(upstream.starts_with("i-"), "{running}");
    assert!(running["ip_address"].is_string());

    // Tags on the instance and its volumes; the key in cloud-init user data as YAML.
    let (ec2, _) = moto.clients().await;
    let described = ec2
        .describe_instances()
        .instance_ids(&upstream)
        .send()
        .await
        .unwrap();
    let machine = &described.reservations()[0].instances()[0];
    let tag = |key: &str| {
        machine
            .tags()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    assert_eq!(tag("cloudbrain:instance-id").as_deref(), Some(id.as_str()));
    assert_eq!(tag("cloudbrain:provider").as_deref(), Some("ec2"));
    assert_eq!(tag("Name"), Some(format!("cloudbrain-{id}")));
    assert_eq!(tag("team").as_deref(), Some("ci"));
    assert_eq!(machine.instance_type().unwrap().as_str(), "t3.medium");
    let volumes = ec2
        .describe_volumes()
        .filters(
            Filter::builder()
                .name("tag:cloudbrain:instance-id")
                .values(&id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(!volumes.volumes().is_empty(), "volumes are not tagged");
    let user_data = moto.user_data(&upstream).await;
    assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
    assert!(
        user_data.contains(&format!("  - \"{ED25519}\"")),
        "{user_data}"
    );

    let (status, gone) = b.delete_and_run_jobs(&id).await;
    assert_eq!(status, 410, "{gone}");
    assert_eq!(moto.machines(&id).await, [InstanceStateName::Terminated]);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_reads_every_page_and_only_our_machines() {
    let moto = Moto::start(&[]);
    let config = moto.config(json!({})).await;
    let ours = moto.provider("ec2", &config).await.with_page_size(5);
    let theirs = moto.provider("other", &config).await;
    let mut made = Vec::new();
    for _ in 0..12 {
        let id = Uuid::new_v4();
        ours.create(id, &spec("ami-12c6146b")).await.unwrap();
        made.push(id);
    }
    theirs
        .create(Uuid::new_v4(), &spec("ami-12c6146b"))
        .await
        .unwrap();
    // moto pages DescribeInstances as EC2 does.
    let (ec2, _) = moto.clients().await;
    let first = ec2
        .describe_instances()
        .max_results(5)
        .send()
        .await
        .unwrap();
    assert!(
        first.next_token().is_some(),
        "one page held everything: paging untested"
    );

    made.sort();
    assert_eq!(machine_ids(&ours).await, made);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_images_and_types_are_invalid() {
    let moto = Moto::start(&[
        ("MOTO_ENABLE_AMI_VALIDATION", "true"),
        ("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true"),
    ]);
    let config = moto
        .config(json!({"instance_types": {"standard": "t3.medium", "bogus": "x9.huge"}}))
        .await;
    let provider = moto.provider("ec2", &config).await;
    let err = provider
        .create(Uuid::new_v4(), &spec("ami-deadbeef"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::Invalid(m) if m.contains("InvalidAMIID")),
        "{err:?}"
    );
    let bogus = InstanceSpec {
        instance_type: "bogus".into(),
        ..spec("ami-12c6146b")
    };
    let err = provider.create(Uuid::new_v4(), &bogus).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Invalid(m) if m.contains("InvalidInstanceType") || m.contains("x9.huge")),
        "{err:?}"
    );
    let err = provider
        .create(Uuid::new_v4(), &spec("no-such-image-name"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::Invalid(m) if m.contains("no-such-image-name")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_name_resolves_to_an_ami_of_ours() {
    let moto = Moto::start(&[]);
    let config = moto.config(json!({})).await;
    let provider = moto.provider("ec2", &config).await;
    let (ec2, _) = moto.clients().await;
    let seed = Uuid::new_v4();
    let machine = provider.create(seed, &spec("ami-12c6146b")).await.unwrap();
    let image = ec2
        .create_image()
        .instance_id(&machine.upstream_id)
        .name("ci-runner")
        .send()
        .await
        .unwrap();
    let image_id = image.image_id().unwrap().to_owned();
    // By name in the request, and as the config's image for a request of "default".
    let mut named = config.clone();
    named["image"] = json!("ci-runner");
    let by_default = moto.provider("ec2", &named).await;
    for (provider, image) in [(&provider, "ci-runner"), (&by_default, "default")] {
        let id = Uuid::new_v4();
        provider.create(id, &spec(image)).await.unwrap();
        let described = ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:cloudbrain:instance-id")
                    .values(id.to_string())
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let launched = described.reservations()[0].instances()[0].image_id();
        assert_eq!(launched, Some(image_id.as_str()), "{image}");
    }
}

type Expect = fn(&ProviderError) -> bool;

/// An endpoint that answers every call with one canned EC2 error.
fn canned(status: u16, code: &str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>canned {code}</Message></Error></Errors><RequestID>r-1</RequestID></Response>"
    );
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 65536];
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = stream.read(&mut buf);
            let _ = write!(
                stream,
                "HTTP/1.1 {status} Canned\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread")]
async fn api_errors_map_to_the_broker_kinds() {
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let cases: [(u16, &str, Expect); 5] = [
        (503, "RequestLimitExceeded", |e| {
            matches!(e, ProviderError::Throttled { .. })
        }),
        (500, "InsufficientInstanceCapacity", |e| {
            matches!(e, ProviderError::Capacity(_))
        }),
        (400, "VcpuLimitExceeded", |e| {
            matches!(e, ProviderError::Capacity(_))
        }),
        (403, "UnauthorizedOperation", |e| {
            matches!(e, ProviderError::Invalid(_))
        }),
        (500, "InternalError", |e| {
            matches!(e, ProviderError::Transient(_))
        }),
    ];
    for (status, code, expected) in cases {
        let config = json!({
            "region": "us-east-1", "endpoint_url": canned(status, code),
            "access_key_id": "testing", "secret_access_key": "testing",
            "subnet_ids": ["subnet-1"], "instance_types": {"standard": "t3.medium"}, "image": "ami-12c6146b",
        });
        let provider = Ec2Provider::new("ec2", Ec2Config::parse(&config).unwrap()).await;
        let err = provider
            .create(Uuid::new_v4(), &spec("ami-12c6146b"))
            .await
            .unwrap_err();
        assert!(expected(&err), "{code}: {err:?}");
    }
    // Nothing listening: transient.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = json!({
        "region": "us-east-1", "endpoint_url": format!("http://127.0.0.1:{port}"),
        "access_key_id": "testing", "secret_access_key": "testing",
        "subnet_ids": ["subnet-1"], "instance_types": {"standard": "t3.medium"}, "image": "ami-12c6146b",
    });
    let provider = Ec2Provider::new("ec2", Ec2Config::parse(&config).unwrap()).await;
    assert!(matches!(
        provider.list().await,
        Err(ProviderError::Transient(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ecs_instance_runs_once_registered_and_is_drained_on_delete() {
    let moto = Moto::start(&[]);
    let (ecs, b) = moto.with_cluster(json!({})).await;
    let id = b.app.create_on(&b.token, "ec2", "ami-12c6146b").await;
    b.workers.run_pending_jobs().await;
    b.workers.refresh.refresh_all().await;
    let (_, waiting) = b.instance(&id).await;
    assert_eq!(
        waiting["state"], "starting",
        "running before it registered: {waiting}"
    );
    assert_eq!(waiting["ecs"]["cluster"], "builds");
    assert!(waiting["ecs"]["container_instance_arn"].is_null());
    let upstream = waiting["upstream_id"].as_str().unwrap().to_owned();

    let user_data = moto.user_data(&upstream).await;
    assert!(user_data.contains("ECS_CLUSTER=builds"), "{user_data}");

    // moto runs no ECS agent: register the machine as the agent would.
    let arn = register(&ecs, &upstream).await;
    b.workers.refresh.refresh_all().await;
    let (_, running) = b.instance(&id).await;
    assert_eq!(running["state"], "running", "{running}");
    assert_eq!(running["ecs"]["container_instance_arn"], arn.as_str());
    assert_eq!(running["ecs"]["status"], "ACTIVE");
    assert!(running["ecs"]["agent_connected"].is_boolean());

    b.app
        .delete(&format!("/instances/{id}"), &b.token)
        .send()
        .await
        .unwrap();
    b.workers.run_pending_jobs().await;
    assert_eq!(b.instance(&id).await.0, 410);
    let left = ecs
        .list_container_instances()
        .cluster("builds")
        .send()
        .await
        .unwrap();
    assert!(
        left.container_instance_arns().is_empty(),
        "still registered: {left:?}"
    );
    assert_eq!(moto.machines(&id).await, [InstanceStateName::Terminated]);
}

#[tokio::test]
async fn an_ecs_district_shows_its_container_instances_and_drains_before_scaling_in() {
    let moto = Moto::start(&[]);
    let (ecs, b) = moto.with_cluster(json!({"drain_timeout_secs": 600})).await;
    let admin = b.client_with(cloudbrain::auth::Scope::Admin).await;
    let pool = json!({"provider": "ec2", "image": "ami-12c6146b", "min_idle": 1, "max_size": 2});
    admin.put("/pools/district", &pool).await.expect(200);
    b.workers.refresh.reconcile_pools().await;
    b.workers.run_pending_jobs().await;
    b.workers.refresh.refresh_all().await;
    let district = b.client().get("/pools/district").await.expect(200);
    let members = &district["container_instances"];
    assert_eq!(members.as_array().map(Vec::len), Some(1), "{district}");
    assert_eq!(members[0]["cluster"], "builds");
    assert!(members[0]["container_instance_arn"].is_null(), "{district}");
    let id = members[0]["instance_id"].as_str().unwrap().to_owned();
    let upstream = b.row(&id).await.upstream_id.unwrap();

    // The agent registers it; ECS places a task on it.
    let (arn, task) = register_with_a_task(&ecs, &upstream).await;
    b.workers.refresh.refresh_all().await;
    let district = b.client().get("/pools/district").await.expect(200);
    let member = &district["container_instances"][0];
    assert_eq!(member["state"], "running", "{district}");
    assert_eq!(member["container_instance_arn"], arn.as_str());
    assert_eq!(member["status"], "ACTIVE");
    assert_eq!(member["running_tasks"], 1, "{district}");
    assert_eq!(member["assigned"], false);

    // Scaled in: the machine is set DRAINING and kept while its task runs.
    admin
        .post("/pools/district/scale", &json!({"min_idle": 0}))
        .await
        .expect(200);
    b.workers.refresh.reconcile_pools().await;
    b.workers.run_pending_jobs().await;
    assert_eq!(
        stands(&b, &moto, &id).await,
        (State::Terminating, vec![InstanceStateName::Running])
    );
    let described = ecs
        .describe_container_instances()
        .cluster("builds")
        .container_instances(&arn)
        .send()
        .await
        .unwrap();
    assert_eq!(
        described.container_instances()[0].status(),
        Some("DRAINING")
    );
    // The district shows it so, the refresh noting what a leaving machine says.
    b.workers.refresh.refresh_all().await;
    let district = b.client().get("/pools/district").await.expect(200);
    let member = &district["container_instances"][0];
    assert_eq!(
        (
            &member["state"],
            &member["status"],
            &member["running_tasks"]
        ),
        (&json!("terminating"), &json!("DRAINING"), &json!(1)),
        "{district}"
    );

    // Its task ends: the machine goes, and leaves the cluster.
    ecs.stop_task()
        .cluster("builds")
        .task(&task)
        .send()
        .await
        .unwrap();
    b.make_jobs_due().await;
    b.workers.run_pending_jobs().await;
    assert_eq!(
        stands(&b, &moto, &id).await,
        (State::Terminated, vec![InstanceStateName::Terminated])
    );
    let left = ecs
        .list_container_instances()
        .cluster("builds")
        .send()
        .await
        .unwrap();
    assert!(left.container_instance_arns().is_empty(), "{left:?}");
}

/// How instance `id` stands: its row's state and its machines' states in EC2.
async fn stands(b: &TestBroker, moto: &Moto, id: &str) -> (State, Vec<InstanceStateName>) {
    (b.row(id).await.state, moto.machines(id).await)
}

/// Registers EC2 instance `upstream` in cluster `builds` as its ECS agent would (moto runs
/// none): its container instance ARN.
async fn register(ecs: &aws_sdk_ecs::Client, upstream: &str) -> String {
    let document = json!({"instanceId": upstream, "region": "us-east-1"}).to_string();
    let registered = ecs
        .register_container_instance()
        .cluster("builds")
        .instance_identity_document(document)
        .send()
        .await
        .unwrap();
    registered
        .container_instance()
        .unwrap()
        .container_instance_arn()
        .unwrap()
        .to_owned()
}

/// Registers `upstream` (see [`register`]) and starts a task on it: its container
/// instance ARN and the task's.
async fn register_with_a_task(ecs: &aws_sdk_ecs::Client, upstream: &str) -> (String, String) {
    let arn = register(ecs, upstream).await;
    let container = aws_sdk_ecs::types::ContainerDefinition::builder()
        .name("build")
        .image("ci:latest")
        .memory(128)
        .build();
    ecs.register_task_definition()
        .family("build")
        .container_definitions(container)
        .send()
        .await
        .unwrap();
    let started = ecs
        .start_task()
        .cluster("builds")
        .task_definition("build")
        .container_instances(&arn)
        .send()
        .await
        .unwrap();
    let task = started.tasks()[0].task_arn().unwrap().to_owned();
    (arn, task)
}

#[tokio::test]
async fn a_machine_whose_tasks_outlast_the_drain_timeout_is_terminated_anyway() {
    let moto = Moto::start(&[]);
    let (ecs, b) = moto.with_cluster(json!({"drain_timeout_secs": 0})).await;
    let id = b.app.create_on(&b.token, "ec2", "ami-12c6146b").await;
    b.workers.run_pending_jobs().await;
    let upstream = b.row(&id).await.upstream_id.unwrap();
    register_with_a_task(&ecs, &upstream).await;
    b.workers.refresh.refresh_all().await;
    b.client()
        .delete(&format!("/instances/{id}"))
        .await
        .expect(200);
    b.workers.run_pending_jobs().await;
    assert_eq!(
        stands(&b, &moto, &id).await,
        (State::Terminated, vec![InstanceStateName::Terminated])
    );
}

#[tokio::test]
async fn a_create_goes_to_the_subnet_it_is_placed_in_and_a_key_goes_through_instance_connect() {
    let moto = Moto::start(&[]);
    let mut config = moto
        .config(json!({"instance_connect_user": "ec2-user"}))
        .await;
    let (ec2, _) = moto.clients().await;
    let first = config["subnet_ids"][0].as_str().unwrap().to_owned();
    let described = ec2
        .describe_subnets()
        .subnet_ids(&first)
        .send()
        .await
        .unwrap();
    let vpc = described.subnets()[0].vpc_id().unwrap().to_owned();
    let made = ec2
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block("10.9.2.0/24")
        .send()
        .await
        .unwrap();
    let second = made.subnet().unwrap().subnet_id().unwrap().to_owned();
    config["subnet_ids"] = json!([first, second]);
    // Its subnets are its placements, equals; with a user, it puts keys on running machines.
    let offer = Ec2Config::parse(&config).unwrap().offer().unwrap();
    assert_eq!(offer.placements, [first.clone(), second.clone()]);
    assert!(offer.spread && offer.authorizes_keys);

    let p = moto.provider("ec2", &config).await;
    let id = Uuid::new_v4();
    let mut placed = spec("ami-12c6146b");
    placed.placement = Some(second.clone());
    p.create(id, &placed).await.unwrap();
    let machine = &moto.described(&id.to_string()).await[0];
    assert_eq!(machine.subnet_id(), Some(second.as_str()));
    placed.placement = Some("subnet-elsewhere".into());
    let refused = p.create(Uuid::new_v4(), &placed).await;
    assert!(
        matches!(refused, Err(ProviderError::Invalid(_))),
        "{refused:?}"
    );

    p.authorize_key(id, ED25519).await.unwrap();
    let nowhere = p.authorize_key(Uuid::new_v4(), ED25519).await;
    assert_eq!(nowhere, Err(ProviderError::NotFound));
}
