//! cloudbrain's GCE provider, on the official `google-cloud-compute-v1` client.
//!
//! VMs are named `cloudbrain-<id>` and labelled `cloudbrain-instance-id` and
//! `cloudbrain-provider`; inserts carry `requestId` = instance id, so a retried create never
//! makes a second VM, and an `alreadyExists` for our own name is adoption. Every zone
//! operation is waited on with a deadline, so an asynchronous failure (quota, an exhausted
//! zone) becomes an error of the right kind. The zones are the config's placements: a
//! create goes to the zone the broker names (after an exhausted zone, the next one).

pub mod config;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use cloudbrain_provider::{
    CloudInstance, CloudState, ConfigError, Factory, InstanceSpec, Offer, Provider, ProviderError,
    TtlCache,
};
use google_cloud_compute_v1::client::{Images, Instances};
use google_cloud_compute_v1::model::{
    self, instance::Status, operation, AccessConfig, AttachedDisk, AttachedDiskInitializeParams,
    Instance, Metadata, NetworkInterface, Operation, Scheduling, ServiceAccount, Tags,
};
use uuid::Uuid;

pub use config::{GceConfig, GceCredentials};

/// The label carrying the broker's instance id.
pub const INSTANCE_LABEL: &str = "cloudbrain-instance-id";
/// The label carrying the provider config's name.
pub const PROVIDER_LABEL: &str = "cloudbrain-provider";

/// A provider config name as a GCE label value.
pub fn label_value(name: &str) -> String {
    let mut value: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    value.truncate(63);
    value
}

/// The metadata item GCE's guest agent reads SSH keys from.
const SSH_KEYS: &str = "ssh-keys";

/// The VM name for an instance.
pub fn vm_name(id: Uuid) -> String {
    format!("cloudbrain-{id}")
}

/// The insert's `requestId`: the instance id in the first zone. GCE answers a repeated
/// requestId with the first operation, failed or not, so a move to another zone after a
/// capacity error needs its own id: one derived from the instance id and the zone's place,
/// still the same on every retry there.
fn request_id(id: Uuid, zone_index: usize) -> String {
    if zone_index == 0 {
        return id.to_string();
    }
    Uuid::new_v5(&id, format!("zone-{zone_index}").as_bytes()).to_string()
}

/// Why the provider could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the Compute API client: {0}")]
pub struct BuildError(String);

/// GCE as the broker's catalog knows it: kind `gce`.
pub struct GceFactory;

#[async_trait]
impl Factory for GceFactory {
    fn kind(&self) -> &'static str {
        "gce"
    }

    fn check(&self, config: &serde_json::Value) -> Result<Offer, ConfigError> {
        GceConfig::parse(config)?.offer()
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &["credentials.key"]
    }

    async fn build(
        &self,
        name: &str,
        config: &serde_json::Value,
    ) -> Result<std::sync::Arc<dyn Provider>, ConfigError> {
        let provider = GceProvider::new(name, GceConfig::parse(config)?)
            .await
            .map_err(|e| ConfigError::new("credentials", e.to_string()))?;
        Ok(std::sync::Arc::new(provider))
    }
}

/// One GCE provider config with its API clients.
pub struct GceProvider {
    name: String,
    label: String,
    config: GceConfig,
    instances: Instances,
    images: Images,
    families: TtlCache,
}

fn credentials(
    config: &GceConfig,
) -> Result<google_cloud_auth::credentials::Credentials, BuildError> {
    match &config.credentials {
        GceCredentials::Anonymous => {
            Ok(google_cloud_auth::credentials::anonymous::Builder::new().build())
        }
        GceCredentials::ServiceAccount { key } => {
            google_cloud_auth::credentials::service_account::Builder::new(key.expose().clone())
                .build()
                .map_err(|e| BuildError(format!("service-account key: {e}")))
        }
        GceCredentials::ApplicationDefault => google_cloud_auth::credentials::Builder::default()
            .build()
            .map_err(|e| BuildError(format!("application default credentials: {e}"))),
    }
}

impl GceProvider {
    /// Builds the clients for `config`, named `name` (the `cloudbrain-provider` label).
    pub async fn new(name: &str, config: GceConfig) -> Result<Self, BuildError> {
        let creds = credentials(&config)?;
        // One retry layer: the broker's job queue (the client's own retries are off).
        let mut instances = Instances::builder()
            .with_credentials(creds.clone())
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry);
        let mut images = Images::builder()
            .with_credentials(creds)
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry);
        if let Some(endpoint) = &config.endpoint {
            instances = instances.with_endpoint(endpoint);
            images = images.with_endpoint(endpoint);
        }
        Ok(Self {
            name: name.to_owned(),
            label: label_value(name),
            instances: instances
                .build()
                .await
                .map_err(|e| BuildError(e.to_string()))?,
            images: images
                .build()
                .await
                .map_err(|e| BuildError(e.to_string()))?,
            config,
            families: TtlCache::new(Duration::from_secs(300)),
        })
    }

    fn zone_url(&self, zone: &str) -> String {
        format!("projects/{}/zones/{zone}", self.config.project)
    }

    /// The image to boot: a URL or path as is, a family resolved to its newest image.
    async fn source_image(&self, image: &str) -> Result<String, ProviderError> {
        if image.contains('/') {
            return Ok(image.to_owned());
        }
        if let Some(link) = self.families.get(image) {
            return Ok(link);
        }
        let project = self
            .config
            .image_project
            .clone()
            .unwrap_or_else(|| self.config.project.clone());
        let found = self
            .images
            .get_from_family()
            .set_project(&project)
            .set_family(image)
            .send()
            .await
            .map_err(from_gax)
            .map_err(|e| match e {
                ProviderError::NotFound => ProviderError::Invalid(format!(
                    "no image family {image:?} in project {project}"
                )),
                other => other,
            })?;
        let link = found
            .self_link
            .or(found
                .name
                .map(|n| format!("projects/{project}/global/images/{n}")))
            .ok_or_else(|| ProviderError::Transient("image family answer without a link".into()))?;
        self.families.put(image, &link);
        Ok(link)
    }

    fn instance_body(
        &self,
        id: Uuid,
        spec: &InstanceSpec,
        zone: &str,
        machine_type: &str,
        image: String,
    ) -> Instance {
        let mut vm = Instance::default();
        vm.name = Some(vm_name(id));
        vm.machine_type = Some(format!(
            "{}/machineTypes/{machine_type}",
            self.zone_url(zone)
        ));
        let mut labels: HashMap<String, String> = self.config.labels.clone().into_iter().collect();
        labels.insert(INSTANCE_LABEL.to_owned(), id.to_string());
        labels.insert(PROVIDER_LABEL.to_owned(), self.label.clone());
        vm.labels = labels;
        let mut params = AttachedDiskInitializeParams::default();
        params.source_image = Some(image);
        params.disk_size_gb = self.config.disk_size_gb;
        let mut disk = AttachedDisk::default();
        disk.boot = Some(true);
        disk.auto_delete = Some(true);
        disk.initialize_params = Some(params);
        vm.disks = vec![disk];
        let mut nic = NetworkInterface::default();
        nic.network = Some(
            self.config
                .network
                .clone()
                .unwrap_or_else(|| "global/networks/default".to_owned()),
        );
        nic.subnetwork = self.config.subnetwork.clone();
        if self.config.public_ip {
            let mut access = AccessConfig::default();
            access.name = Some("External NAT".to_owned());
            access.r#type = Some(model::access_config::Type::OneToOneNat);
            nic.access_configs = vec![access];
        }
        vm.network_interfaces = vec![nic];
        if let Some(key) = &spec.public_ssh_key {
            // The key goes into metadata, never into a startup script.
            let mut metadata = Metadata::default();
            self.add_key(&mut metadata, key);
            vm.metadata = Some(metadata);
        }
        if let Some(email) = &self.config.service_account {
            let mut account = ServiceAccount::default();
            account.email = Some(email.clone());
            account.scopes = self.config.scopes.clone();
            vm.service_accounts = vec![account];
        }
        if self.config.preemptible || self.config.spot {
            let mut scheduling = Scheduling::default();
            if self.config.spot {
                scheduling.provisioning_model = Some(model::scheduling::ProvisioningModel::Spot);
            } else {
                scheduling.preemptible = Some(true);
            }
            scheduling.automatic_restart = Some(false);
            scheduling.on_host_maintenance = Some(model::scheduling::OnHostMaintenance::Terminate);
            vm.scheduling = Some(scheduling);
        }
        if !self.config.tags.is_empty() {
            let mut tags = Tags::default();
            tags.items = self.config.tags.clone();
            vm.tags = Some(tags);
        }
        vm
    }

    /// Waits for a zone operation to finish, within the configured deadline.
    async fn wait(&self, zone: &str, mut op: Operation) -> Result<Operation, ProviderError> {
        let deadline = Instant::now() + Duration::from_secs(self.config.operation_timeout_secs);
        loop {
            if op.status == Some(operation::Status::Done) {
                return match operation_error(&op) {
                    Some(err) => Err(err),
                    None => Ok(op),
                };
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::Transient(format!(
                    "zone operation {} still running after {} s",
                    op.name.as_deref().unwrap_or("?"),
                    self.config.operation_timeout_secs
                )));
            }
            tokio::time::sleep(Duration::from_millis(self.config.operation_poll_ms)).await;
            let name = op
                .name
                .clone()
                .ok_or_else(|| ProviderError::Transient("operation without a name".into()))?;
            op = self
                .instances
                .get_operation()
                .set_project(&self.config.project)
                .set_zone(zone)
                .set_operation(name)
                .send()
                .await
                .map_err(from_gax)?;
        }
    }

    /// Adds `key` for the config's `ssh_user` to `metadata`'s `ssh-keys`, once.
    fn add_key(&self, metadata: &mut Metadata, key: &str) {
        let line = format!("{}:{}", self.config.ssh_user, key.trim_end());
        let keys = metadata
            .items
            .iter_mut()
            .find(|item| item.key.as_deref() == Some(SSH_KEYS));
        match keys {
            Some(item) => {
                let value = item.value.get_or_insert_default();
                if !value.lines().any(|l| l == line) {
                    if !value.is_empty() {
                        value.push('\n');
                    }
                    value.push_str(&line);
                }
            }
            None => {
                let mut item = model::metadata::Items::default();
                item.key = Some(SSH_KEYS.to_owned());
                item.value = Some(line);
                metadata.items.push(item);
            }
        }
    }

    /// The VM of instance `id` and its zone, looking in every configured zone.
    async fn find(&self, id: Uuid) -> Result<Option<(String, Instance)>, ProviderError> {
        for zone in &self.config.zones {
            match self
                .instances
                .get()
                .set_project(&self.config.project)
                .set_zone(zone)
                .set_instance(vm_name(id))
                .send()
                .await
                .map_err(from_gax)
            {
                Ok(vm) => return Ok(Some((zone.clone(), vm))),
                Err(ProviderError::NotFound) => continue,
                Err(other) => return Err(other),
            }
        }
        Ok(None)
    }

    fn cloud_instance(&self, vm: &Instance) -> Option<CloudInstance> {
        let id = Uuid::parse_str(vm.labels.get(INSTANCE_LABEL)?).ok()?;
        let state = match &vm.status {
            Some(Status::Provisioning | Status::Staging | Status::Pending) => CloudState::Starting,
            Some(Status::Running) => CloudState::Running,
            Some(Status::Deprovisioning) => CloudState::Terminating,
            Some(
                status @ (Status::Stopping
                | Status::Stopped
                | Status::Suspending
                | Status::Suspended
                | Status::Terminated),
            ) => CloudState::Failed(format!(
                "the VM was stopped or preempted (GCE status {})",
                status.name().unwrap_or("unknown")
            )),
            _ => CloudState::Starting,
        };
        let nic = vm.network_interfaces.first();
        let ip = nic
            .and_then(|n| n.access_configs.iter().find_map(|a| a.nat_ip.clone()))
            .or_else(|| nic.and_then(|n| n.network_ip.clone()));
        Some(CloudInstance {
            id,
            upstream_id: vm.id.map(|i| i.to_string()).or_else(|| vm.name.clone())?,
            state,
            ip_address: ip,
            launched_at: vm
                .creation_timestamp
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(SystemTime::from),
            details: Default::default(),
        })
    }

    fn view(&self, vm: &Instance) -> Result<CloudInstance, ProviderError> {
        self.cloud_instance(vm)
            .ok_or_else(|| ProviderError::Transient("a VM came back without its labels".into()))
    }
}

/// The error a finished operation reports, by its first error's code.
fn operation_error(op: &Operation) -> Option<ProviderError> {
    let first = op.error.as_ref().and_then(|e| e.errors.first());
    if first.is_none() && op.http_error_status_code.is_none_or(|s| s < 400) {
        return None;
    }
    let code = first.and_then(|e| e.code.clone()).unwrap_or_default();
    let message = first
        .and_then(|e| e.message.clone())
        .or_else(|| op.http_error_message.clone())
        .unwrap_or_default();
    let described = format!("{code}: {message}");
    Some(match code.as_str() {
        c if c.starts_with("ZONE_RESOURCE_POOL_EXHAUSTED")
            || c == "QUOTA_EXCEEDED"
            || c == "RESOURCE_EXHAUSTED" =>
        {
            ProviderError::Capacity(described)
        }
        "RATE_LIMIT_EXCEEDED" => ProviderError::Throttled { retry_after: None },
        "RESOURCE_NOT_FOUND"
        | "INVALID_FIELD_VALUE"
        | "INVALID_USAGE"
        | "BAD_REQUEST"
        | "PERMISSION_DENIED"
        | "RESOURCE_NOT_READY"
        | "UNSUPPORTED_OPERATION" => ProviderError::Invalid(described),
        _ => match op.http_error_status_code {
            Some(400 | 403 | 404) => ProviderError::Invalid(described),
            Some(429) => ProviderError::Throttled { retry_after: None },
            _ => ProviderError::Transient(described),
        },
    })
}

/// Maps a client error: by HTTP status, with rate and quota messages told apart.
pub fn from_gax(err: google_cloud_gax::error::Error) -> ProviderError {
    if err.is_timeout() || err.is_io() || err.is_connect() || err.is_transport() {
        return ProviderError::Transient(format!("Compute API unreachable: {err}"));
    }
    let message = err
        .status()
        .map(|s| s.message.clone())
        .unwrap_or_else(|| err.to_string());
    let lower = message.to_ascii_lowercase();
    match err.http_status_code() {
        Some(404) => ProviderError::NotFound,
        Some(429) => ProviderError::Throttled { retry_after: None },
        Some(403) if lower.contains("rate limit") || lower.contains("ratelimitexceeded") => {
            ProviderError::Throttled { retry_after: None }
        }
        Some(403) if lower.contains("quota") => ProviderError::Capacity(message),
        Some(400..=499) => ProviderError::Invalid(message),
        _ => ProviderError::Transient(message),
    }
}

#[async_trait]
impl Provider for GceProvider {
    async fn create(&self, id: Uuid, spec: &InstanceSpec) -> Result<CloudInstance, ProviderError> {
        if let Some((_, vm)) = self.find(id).await? {
            return self.view(&vm);
        }
        let machine_type = spec.cloud_type(&self.config.machine_types)?;
        let image = spec.image_or(&self.config.image);
        let image = self.source_image(image).await?;
        let zone = spec
            .placement
            .clone()
            .unwrap_or_else(|| self.config.zones[0].clone());
        let Some(index) = self.config.zones.iter().position(|z| *z == zone) else {
            return Err(ProviderError::Invalid(format!(
                "zone {zone:?} is not one of this config's zones"
            )));
        };
        let body = self.instance_body(id, spec, &zone, machine_type, image);
        let inserted = self
            .instances
            .insert()
            .set_project(&self.config.project)
            .set_zone(&zone)
            .set_request_id(request_id(id, index))
            .set_body(body)
            .send()
            .await;
        let result = match inserted {
            Ok(op) => self.wait(&zone, op).await.map(|_| ()),
            Err(err) if err.http_status_code() == Some(409) => Ok(()), // our own name: adopt it
            Err(err) => Err(from_gax(err)),
        };
        if let Err(ProviderError::Capacity(reason)) = &result {
            tracing::warn!(instance.id = %id, zone, reason, "zone {zone} has no room");
        }
        result?;
        tracing::info!(instance.id = %id, zone, provider = %self.name, "inserted GCE VM for {id}");
        match self.find(id).await? {
            Some((_, vm)) => self.view(&vm),
            None => Err(ProviderError::Transient(
                "the VM was inserted but cannot be read yet".into(),
            )),
        }
    }

    async fn get(&self, id: Uuid) -> Result<CloudInstance, ProviderError> {
        match self.find(id).await? {
            Some((_, vm)) => self.view(&vm),
            None => Err(ProviderError::NotFound),
        }
    }

    async fn list(&self) -> Result<Vec<CloudInstance>, ProviderError> {
        let filter = format!("labels.{PROVIDER_LABEL} = \"{}\"", self.label);
        let mut all = Vec::new();
        for zone in &self.config.zones {
            let mut token: Option<String> = None;
            loop {
                let page = self
                    .instances
                    .list()
                    .set_project(&self.config.project)
                    .set_zone(zone)
                    .set_filter(&filter)
                    .set_max_results(self.config.page_size)
                    .set_or_clear_page_token(token.clone())
                    .send()
                    .await
                    .map_err(from_gax)?;
                all.extend(page.items.iter().filter_map(|vm| self.cloud_instance(vm)));
                match page.next_page_token.filter(|t| !t.is_empty()) {
                    Some(next) => token = Some(next),
                    None => break,
                }
            }
        }
        Ok(all)
    }

    async fn destroy(&self, id: Uuid) -> Result<(), ProviderError> {
        let Some((zone, _)) = self.find(id).await? else {
            return Ok(());
        };
        let deleted = self
            .instances
            .delete()
            .set_project(&self.config.project)
            .set_zone(&zone)
            .set_instance(vm_name(id))
            .send()
            .await
            .map_err(from_gax);
        match deleted {
            Ok(op) => self.wait(&zone, op).await.map(|_| ()),
            Err(ProviderError::NotFound) => Ok(()),
            Err(other) => Err(other),
        }
    }

    async fn authorize_key(&self, id: Uuid, key: &str) -> Result<(), ProviderError> {
        let Some((zone, vm)) = self.find(id).await? else {
            return Err(ProviderError::NotFound);
        };
        // The fingerprint read with the metadata guards against a concurrent change.
        let mut metadata = vm.metadata.unwrap_or_default();
        self.add_key(&mut metadata, key);
        let op = self
            .instances
            .set_metadata()
            .set_project(&self.config.project)
            .set_zone(&zone)
            .set_instance(vm_name(id))
            .set_body(metadata)
            .send()
            .await
            .map_err(from_gax)?;
        self.wait(&zone, op).await.map(|_| ())?;
        tracing::info!(instance.id = %id, zone, "put a key on GCE VM {}", vm_name(id));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_valid_for_gce() {
        let id = Uuid::new_v4();
        assert!(vm_name(id).len() <= 63);
        assert_eq!(label_value("GCE.us-Central"), "gce-us-central");
        assert!(config::is_label(&label_value("Ünïcode name!"), false));
    }

    #[test]
    fn finished_operations_map_their_errors() {
        let failed = |code: &str| {
            let mut e = operation::error::Errors::default();
            e.code = Some(code.to_owned());
            e.message = Some("m".into());
            let mut err = operation::Error::default();
            err.errors = vec![e];
            let mut op = Operation::default();
            op.status = Some(operation::Status::Done);
            op.error = Some(err);
            operation_error(&op)
        };
        assert!(matches!(
            failed("ZONE_RESOURCE_POOL_EXHAUSTED"),
            Some(ProviderError::Capacity(_))
        ));
        assert!(matches!(
            failed("QUOTA_EXCEEDED"),
            Some(ProviderError::Capacity(_))
        ));
        assert!(matches!(
            failed("RESOURCE_NOT_FOUND"),
            Some(ProviderError::Invalid(_))
        ));
        assert!(matches!(
            failed("SOMETHING_NEW"),
            Some(ProviderError::Transient(_))
        ));
        let mut done = Operation::default();
        done.status = Some(operation::Status::Done);
        assert_eq!(operation_error(&done), None);
    }
}
