//! cloudbrain's EC2 provider, on the official `aws-sdk-ec2` and `aws-sdk-ecs` crates.
//!
//! Machines are tagged `cloudbrain:instance-id`, `cloudbrain:provider` and
//! `Name=cloudbrain-<id>`, so `list` finds only ours and a retried create finds the machine
//! an earlier attempt made. With `ecs_cluster` set, a machine joins that ECS cluster as a
//! container instance (through cloud-init writing `/etc/ecs/ecs.config`), is drained before
//! it is terminated, and counts as running only once it registered.

pub mod config;
pub mod errors;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::types::{
    Filter, IamInstanceProfileSpecification, Instance, InstanceStateName, InstanceType,
    ResourceType, Tag, TagSpecification,
};
use aws_sdk_ecs::types::ContainerInstanceStatus;
use base64::Engine;
use cloudbrain_provider::{
    CloudInstance, CloudState, ConfigError, Details, Drain, Factory, InstanceSpec, Offer, Provider,
    ProviderError, TtlCache,
};
use uuid::Uuid;

pub use config::Ec2Config;
use errors::from_sdk;

/// The tag carrying the broker's instance id.
pub const INSTANCE_TAG: &str = "cloudbrain:instance-id";
/// The tag carrying the provider config's name.
pub const PROVIDER_TAG: &str = "cloudbrain:provider";
/// How long a resolved AMI name is trusted.
const IMAGE_CACHE_TTL: Duration = Duration::from_secs(300);
/// DescribeInstances page size (in reservations, as EC2 counts them).
const PAGE_SIZE: i32 = 100;
/// Machine states `list` and `get` report; terminated machines linger in EC2 for an hour
/// and are nobody's to manage.
const LIVE_STATES: [&str; 5] = ["pending", "running", "shutting-down", "stopping", "stopped"];

/// How a machine stands in the ECS cluster it was told to join: its `ecs` detail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EcsMembership {
    /// The cluster's name.
    pub cluster: String,
    /// Its container instance ARN, once the ECS agent registered it.
    pub container_instance_arn: Option<String>,
    /// ECS's status of the container instance (`ACTIVE`, `DRAINING`, …), once registered.
    pub status: Option<String>,
    /// Whether the ECS agent is connected.
    pub agent_connected: bool,
    /// Tasks running on it.
    #[serde(default)]
    pub running_tasks: i32,
    /// Tasks placed on it and not started yet.
    #[serde(default)]
    pub pending_tasks: i32,
}

/// EC2 as the broker's catalog knows it: kind `ec2`.
pub struct Ec2Factory;

#[async_trait]
impl Factory for Ec2Factory {
    fn kind(&self) -> &'static str {
        "ec2"
    }

    fn check(&self, config: &serde_json::Value) -> Result<Offer, ConfigError> {
        Ec2Config::parse(config)?.offer()
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &["secret_access_key"]
    }

    async fn build(
        &self,
        name: &str,
        config: &serde_json::Value,
    ) -> Result<std::sync::Arc<dyn Provider>, ConfigError> {
        let config = Ec2Config::parse(config)?;
        Ok(std::sync::Arc::new(Ec2Provider::new(name, config).await))
    }
}

/// One EC2 provider config with its API clients.
pub struct Ec2Provider {
    name: String,
    config: Ec2Config,
    ec2: aws_sdk_ec2::Client,
    ecs: aws_sdk_ecs::Client,
    connect: aws_sdk_ec2instanceconnect::Client,
    images: TtlCache,
    page_size: i32,
}

impl Ec2Provider {
    /// Builds the clients for `config`, named `name` (the `cloudbrain:provider` tag).
    pub async fn new(name: &str, config: Ec2Config) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            // One retry layer: the broker's queue (see `errors`).
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_timeout(Duration::from_secs(30))
                    .build(),
            );
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                id,
                secret.expose(),
                config.session_token.as_ref().map(|t| t.expose().clone()),
                None,
                "cloudbrain-provider-config",
            ));
        }
        let shared = loader.load().await;
        Self {
            name: name.to_owned(),
            ec2: aws_sdk_ec2::Client::new(&shared),
            ecs: aws_sdk_ecs::Client::new(&shared),
            connect: aws_sdk_ec2instanceconnect::Client::new(&shared),
            config,
            images: TtlCache::new(IMAGE_CACHE_TTL),
            page_size: PAGE_SIZE,
        }
    }

    /// Sets the DescribeInstances page size (EC2 accepts 5 to 1000).
    pub fn with_page_size(mut self, size: i32) -> Self {
        self.page_size = size.clamp(5, 1000);
        self
    }

    fn tag_filter(key: &str, value: &str) -> Filter {
        Filter::builder()
            .name(format!("tag:{key}"))
            .values(value)
            .build()
    }

    fn live_filter() -> Filter {
        let mut filter = Filter::builder().name("instance-state-name");
        for state in LIVE_STATES {
            filter = filter.values(state);
        }
        filter.build()
    }

    /// Every live machine matching `filters`, across all pages.
    async fn describe(&self, filters: Vec<Filter>) -> Result<Vec<Instance>, ProviderError> {
        let mut pages = self
            .ec2
            .describe_instances()
            .set_filters(Some(filters))
            .filters(Self::live_filter())
            .max_results(self.page_size)
            .into_paginator()
            .send();
        let mut machines = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(from_sdk)?;
            for reservation in page.reservations() {
                machines.extend(reservation.instances().iter().cloned());
            }
        }
        Ok(machines)
    }

    /// The machines made for instance `id` by this provider config.
    async fn find(&self, id: Uuid) -> Result<Vec<Instance>, ProviderError> {
        self.describe(vec![
            Self::tag_filter(INSTANCE_TAG, &id.to_string()),
            Self::tag_filter(PROVIDER_TAG, &self.name),
        ])
        .await
    }

    /// The AMI to launch: an id as is, a name resolved to the newest image (cached).
    async fn image_id(&self, image: &str) -> Result<String, ProviderError> {
        if image.starts_with("ami-") {
            return Ok(image.to_owned());
        }
        if let Some(id) = self.images.get(image) {
            return Ok(id);
        }
        let found = self
            .ec2
            .describe_images()
            .set_owners(Some(self.config.image_owners.clone()))
            .filters(Filter::builder().name("name").values(image).build())
            .send()
            .await
            .map_err(from_sdk)?;
        // ISO 8601 timestamps sort as text.
        let newest = found
            .images()
            .iter()
            .filter(|i| i.image_id().is_some())
            .max_by(|a, b| a.creation_date().cmp(&b.creation_date()))
            .and_then(|i| i.image_id())
            .ok_or_else(|| {
                ProviderError::Invalid(format!(
                    "no AMI named {image:?} owned by {}",
                    self.config.image_owners.join(", ")
                ))
            })?
            .to_owned();
        self.images.put(image, &newest);
        Ok(newest)
    }

    fn tags(&self, id: Uuid) -> Vec<Tag> {
        let mut tags = vec![
            Tag::builder()
                .key(INSTANCE_TAG)
                .value(id.to_string())
                .build(),
            Tag::builder().key(PROVIDER_TAG).value(&self.name).build(),
            Tag::builder()
                .key("Name")
                .value(format!("cloudbrain-{id}"))
                .build(),
        ];
        for (key, value) in &self.config.tags {
            tags.push(Tag::builder().key(key).value(value).build());
        }
        tags
    }

    /// Reads what ECS says of the cluster's container instances, by EC2 instance id.
    async fn container_instances(&self) -> Result<HashMap<String, EcsMembership>, ProviderError> {
        let Some(cluster) = &self.config.ecs_cluster else {
            return Ok(HashMap::new());
        };
        let mut arns = Vec::new();
        let mut pages = self
            .ecs
            .list_container_instances()
            .cluster(cluster)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            arns.extend(
                page.map_err(from_sdk)?
                    .container_instance_arns()
                    .iter()
                    .cloned(),
            );
        }
        let mut members = HashMap::new();
        for batch in arns.chunks(100) {
            let described = self
                .ecs
                .describe_container_instances()
                .cluster(cluster)
                .set_container_instances(Some(batch.to_vec()))
                .send()
                .await
                .map_err(from_sdk)?;
            for ci in described.container_instances() {
                if let Some(ec2_id) = ci.ec2_instance_id() {
                    members.insert(
                        ec2_id.to_owned(),
                        EcsMembership {
                            cluster: cluster.clone(),
                            container_instance_arn: ci.container_instance_arn().map(str::to_owned),
                            status: ci.status().map(str::to_owned),
                            agent_connected: ci.agent_connected(),
                            running_tasks: ci.running_tasks_count(),
                            pending_tasks: ci.pending_tasks_count(),
                        },
                    );
                }
            }
        }
        Ok(members)
    }

    /// The EC2 ids of instance `id`'s machines, and the cluster's container instances by
    /// EC2 id (none without `ecs_cluster`).
    async fn membership(
        &self,
        id: Uuid,
    ) -> Result<(Vec<String>, HashMap<String, EcsMembership>), ProviderError> {
        let ids: Vec<String> = self
            .find(id)
            .await?
            .iter()
            .filter_map(|m| m.instance_id().map(str::to_owned))
            .collect();
        if ids.is_empty() || self.config.ecs_cluster.is_none() {
            return Ok((ids, HashMap::new()));
        }
        Ok((ids, self.container_instances().await?))
    }

    /// Stops ECS placing tasks on these container instances (DRAINING), as Barcelona did
    /// before taking one away.
    async fn set_draining(&self, members: &[&EcsMembership]) -> Result<(), ProviderError> {
        let active: Vec<String> = members
            .iter()
            .filter(|m| m.status.as_deref() != Some("DRAINING"))
            .filter_map(|m| m.container_instance_arn.clone())
            .collect();
        let Some(cluster) = self.config.ecs_cluster.as_deref() else {
            return Ok(());
        };
        if active.is_empty() {
            return Ok(());
        }
        self.ecs
            .update_container_instances_state()
            .cluster(cluster)
            .set_container_instances(Some(active))
            .status(ContainerInstanceStatus::Draining)
            .send()
            .await
            .map_err(from_sdk)?;
        Ok(())
    }

    /// Turns an EC2 instance into the broker's view of it.
    fn cloud_instance(
        &self,
        machine: &Instance,
        members: &HashMap<String, EcsMembership>,
    ) -> Option<CloudInstance> {
        let id = machine
            .tags()
            .iter()
            .find(|t| t.key() == Some(INSTANCE_TAG))
            .and_then(|t| t.value())
            .and_then(|v| Uuid::parse_str(v).ok())?;
        let upstream_id = machine.instance_id()?.to_owned();
        let ecs = self.config.ecs_cluster.as_ref().map(|cluster| {
            members.get(&upstream_id).cloned().unwrap_or(EcsMembership {
                cluster: cluster.clone(),
                container_instance_arn: None,
                status: None,
                agent_connected: false,
                running_tasks: 0,
                pending_tasks: 0,
            })
        });
        let registered = ecs
            .as_ref()
            .is_none_or(|m| m.container_instance_arn.is_some());
        let state = match machine.state().and_then(|s| s.name()) {
            Some(InstanceStateName::Pending) => CloudState::Starting,
            Some(InstanceStateName::Running)
                if registered || !self.config.require_ecs_registration =>
            {
                CloudState::Running
            }
            Some(InstanceStateName::Running) => CloudState::Starting,
            Some(
                InstanceStateName::ShuttingDown
                | InstanceStateName::Stopping
                | InstanceStateName::Stopped,
            ) => CloudState::Terminating,
            Some(InstanceStateName::Terminated) => CloudState::Terminated,
            _ => CloudState::Starting,
        };
        Some(CloudInstance {
            id,
            upstream_id,
            state,
            ip_address: machine
                .private_ip_address()
                .or(machine.public_ip_address())
                .map(str::to_owned),
            launched_at: machine
                .launch_time()
                .and_then(|t| SystemTime::try_from(*t).ok()),
            details: ecs
                .and_then(|m| serde_json::to_value(m).ok())
                .map(|m| Details::from([("ecs".to_owned(), m)]))
                .unwrap_or_default(),
        })
    }

    async fn view(&self, machine: &Instance) -> Result<CloudInstance, ProviderError> {
        let members = self.container_instances().await?;
        self.cloud_instance(machine, &members).ok_or_else(|| {
            ProviderError::Transient("EC2 returned an instance without its tags".to_owned())
        })
    }
}

/// cloud-init user data: the SSH key as a YAML string (never spliced into a script), and
/// the ECS cluster to join.
pub fn user_data(ssh_key: Option<&str>, ecs_cluster: Option<&str>) -> String {
    // A JSON string is a valid YAML double-quoted scalar: escaping is serde_json's.
    let quote = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let mut doc = String::from("#cloud-config\n");
    if let Some(key) = ssh_key {
        doc.push_str(&format!(
            "ssh_authorized_keys:\n  - {}\n",
            quote(key.trim_end())
        ));
    }
    if let Some(cluster) = ecs_cluster {
        doc.push_str(&format!(
            "write_files:\n  - path: /etc/ecs/ecs.config\n    append: true\n    content: {}\n",
            quote(&format!("ECS_CLUSTER={cluster}\n"))
        ));
    }
    doc
}

#[async_trait]
impl Provider for Ec2Provider {
    async fn create(&self, id: Uuid, spec: &InstanceSpec) -> Result<CloudInstance, ProviderError> {
        // A retried job must find the machine an earlier attempt made, also where the
        // endpoint ignores ClientToken.
        if let Some(existing) = self.find(id).await?.first() {
            return self.view(existing).await;
        }
        let instance_type = spec.cloud_type(&self.config.instance_types)?;
        let image = spec.image_or(&self.config.image);
        let image_id = self.image_id(image).await?;
        // The subnet the broker places it in (after no room elsewhere), else the one its id
        // picks; a retry asks for the same thing.
        let subnets = &self.config.subnet_ids;
        let picked = &subnets[cloudbrain_provider::first_placement(id, subnets.len())];
        let subnet = spec.placement.as_ref().unwrap_or(picked);
        if !subnets.contains(subnet) {
            return Err(ProviderError::Invalid(format!(
                "subnet {subnet:?} is not one of this config's subnet_ids"
            )));
        }
        // EC2 answers a repeated ClientToken with the first call's result: a move to
        // another subnet needs its own, derived from the instance id and the subnet.
        let client_token = if subnet == picked {
            id.to_string()
        } else {
            Uuid::new_v5(&id, subnet.as_bytes()).to_string()
        };
        let user_data = user_data(
            spec.public_ssh_key.as_deref(),
            self.config.ecs_cluster.as_deref(),
        );
        let tags = self.tags(id);
        let mut request = self
            .ec2
            .run_instances()
            .image_id(image_id)
            .instance_type(InstanceType::from(instance_type))
            .min_count(1)
            .max_count(1)
            .subnet_id(subnet)
            .set_security_group_ids(
                Some(self.config.security_group_ids.clone()).filter(|g| !g.is_empty()),
            )
            .user_data(base64::engine::general_purpose::STANDARD.encode(user_data))
            .client_token(client_token)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(tags.clone()))
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(tags))
                    .build(),
            );
        if let Some(profile) = &self.config.iam_instance_profile {
            let spec = if profile.starts_with("arn:") {
                IamInstanceProfileSpecification::builder()
                    .arn(profile)
                    .build()
            } else {
                IamInstanceProfileSpecification::builder()
                    .name(profile)
                    .build()
            };
            request = request.iam_instance_profile(spec);
        }
        if let Some(key) = &self.config.key_name {
            request = request.key_name(key);
        }
        let launched = request.send().await.map_err(from_sdk)?;
        let machine = launched.instances().first().ok_or_else(|| {
            ProviderError::Transient("RunInstances returned no instance".to_owned())
        })?;
        tracing::info!(instance.id = %id, upstream_id = machine.instance_id().unwrap_or_default(), provider = %self.name, "launched EC2 instance for {id}");
        self.cloud_instance(machine, &HashMap::new())
            .ok_or_else(|| {
                ProviderError::Transient(
                    "RunInstances returned an instance without its tags".to_owned(),
                )
            })
    }

    async fn get(&self, id: Uuid) -> Result<CloudInstance, ProviderError> {
        let machines = self.find(id).await?;
        let machine = machines.first().ok_or(ProviderError::NotFound)?;
        self.view(machine).await
    }

    async fn list(&self) -> Result<Vec<CloudInstance>, ProviderError> {
        let machines = self
            .describe(vec![Self::tag_filter(PROVIDER_TAG, &self.name)])
            .await?;
        let members = self.container_instances().await?;
        Ok(machines
            .iter()
            .filter_map(|m| self.cloud_instance(m, &members))
            .collect())
    }

    async fn authorize_key(&self, id: Uuid, key: &str) -> Result<(), ProviderError> {
        let Some(user) = &self.config.instance_connect_user else {
            return Err(ProviderError::Invalid(
                "instance_connect_user is not set: keys go only on new machines".into(),
            ));
        };
        let machines = self.find(id).await?;
        let Some(instance_id) = machines.iter().find_map(|m| m.instance_id()) else {
            return Err(ProviderError::NotFound);
        };
        self.connect
            .send_ssh_public_key()
            .instance_id(instance_id)
            .instance_os_user(user)
            .ssh_public_key(key)
            .send()
            .await
            .map_err(from_sdk)?;
        tracing::info!(instance.id = %id, "sent a key to {instance_id} through EC2 Instance Connect");
        Ok(())
    }

    async fn drain(&self, id: Uuid) -> Result<Drain, ProviderError> {
        let (ids, members) = self.membership(id).await?;
        let mine: Vec<&EcsMembership> = ids.iter().filter_map(|i| members.get(i)).collect();
        let busy: i32 = mine.iter().map(|m| m.running_tasks + m.pending_tasks).sum();
        self.set_draining(&mine).await?;
        if busy == 0 {
            return Ok(Drain::Done);
        }
        Ok(Drain::Draining {
            what: format!("{busy} ECS tasks still on its container instance"),
            at_most: Duration::from_secs(self.config.drain_timeout_secs),
        })
    }

    async fn destroy(&self, id: Uuid) -> Result<(), ProviderError> {
        let (ids, members) = self.membership(id).await?;
        if ids.is_empty() {
            return Ok(());
        }
        let mine: Vec<&EcsMembership> = ids.iter().filter_map(|i| members.get(i)).collect();
        self.set_draining(&mine).await?;
        let registered: Vec<String> = mine
            .iter()
            .filter_map(|m| m.container_instance_arn.clone())
            .collect();
        let cluster = self.config.ecs_cluster.as_deref();
        match self
            .ec2
            .terminate_instances()
            .set_instance_ids(Some(ids))
            .send()
            .await
            .map_err(from_sdk)
        {
            Ok(_) | Err(ProviderError::NotFound) => {}
            Err(other) => return Err(other),
        }
        if let Some(cluster) = cluster {
            for arn in registered {
                // Terminated: take it out of the cluster rather than leave it inactive.
                self.ecs
                    .deregister_container_instance()
                    .cluster(cluster)
                    .container_instance(arn)
                    .force(true)
                    .send()
                    .await
                    .map_err(from_sdk)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_quotes_the_key_and_joins_the_cluster() {
        let data = user_data(Some("ssh-ed25519 AAAA\" $(reboot) ci"), Some("builds"));
        assert_eq!(
            data,
            "#cloud-config\nssh_authorized_keys:\n  - \"ssh-ed25519 AAAA\\\" $(reboot) ci\"\n\
             write_files:\n  - path: /etc/ecs/ecs.config\n    append: true\n    content: \"ECS_CLUSTER=builds\\n\"\n"
        );
        assert_eq!(user_data(None, None), "#cloud-config\n");
    }
}
