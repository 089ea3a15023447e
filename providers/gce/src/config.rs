//! The GCE provider's configuration, as stored (sealed) by `insert-provider --type gce`.

use std::collections::BTreeMap;

use cloudbrain_provider::{validate_instance_types, ConfigError, Offer, Secret};
use serde::{Deserialize, Serialize};

/// How the provider authenticates to the Compute API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum GceCredentials {
    /// A service-account key (the JSON file Google issues), kept in the sealed config.
    ServiceAccount {
        /// The key file's contents.
        key: Secret<serde_json::Value>,
    },
    /// Application default credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud, metadata server).
    ApplicationDefault,
    /// No credentials: only for a test endpoint.
    Anonymous,
}

/// Settings of one GCE provider config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GceConfig {
    /// The project VMs are made in.
    pub project: String,
    /// Zones to use, in order; a capacity error in one moves the next attempt to the next.
    pub zones: Vec<String>,
    /// The broker's instance type names mapped to GCE machine types.
    pub machine_types: BTreeMap<String, String>,
    /// The type a request gets when it names none or `default` (see
    /// [`cloudbrain_provider::default_instance_type`]).
    #[serde(default)]
    pub default_instance_type: Option<String>,
    /// A full image URL (or `projects/…/global/images/…` path), or an image family.
    pub image: String,
    /// The project an image family is looked up in (default: `project`).
    #[serde(default)]
    pub image_project: Option<String>,
    /// The VPC network (default `global/networks/default`).
    #[serde(default)]
    pub network: Option<String>,
    /// The subnetwork, for custom-mode networks.
    #[serde(default)]
    pub subnetwork: Option<String>,
    /// Whether VMs get an external IP (default false).
    #[serde(default)]
    pub public_ip: bool,
    /// A service account for the VMs; none by default.
    #[serde(default)]
    pub service_account: Option<String>,
    /// OAuth scopes for that service account; none by default.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Preemptible VMs.
    #[serde(default)]
    pub preemptible: bool,
    /// Spot VMs.
    #[serde(default)]
    pub spot: bool,
    /// Network tags (for firewall rules).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Extra labels on every VM.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The user the SSH key is for, in `ssh-keys` metadata (default `cloudbrain`).
    #[serde(default = "default_ssh_user")]
    pub ssh_user: String,
    /// Boot disk size in GB (default: the image's).
    #[serde(default)]
    pub disk_size_gb: Option<i64>,
    /// Another endpoint than Google's (a test server).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// How to authenticate (default: application default credentials).
    #[serde(default = "default_credentials")]
    pub credentials: GceCredentials,
    /// How long to wait for a zone operation, in seconds (default 120).
    #[serde(default = "default_operation_timeout")]
    pub operation_timeout_secs: u64,
    /// How often to poll a zone operation, in milliseconds (default 1000).
    #[serde(default = "default_poll_interval")]
    pub operation_poll_ms: u64,
    /// Instances per page when listing (default 500).
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Most Compute API calls started per second, per process.
    #[serde(default = "cloudbrain_provider::default_rate_limit")]
    pub rate_limit: f64,
    /// Most Compute API calls in flight, per process.
    #[serde(default = "cloudbrain_provider::default_max_concurrency")]
    pub max_concurrency: usize,
}

fn default_ssh_user() -> String {
    "cloudbrain".to_owned()
}
fn default_credentials() -> GceCredentials {
    GceCredentials::ApplicationDefault
}
fn default_operation_timeout() -> u64 {
    120
}
fn default_poll_interval() -> u64 {
    1000
}
fn default_page_size() -> u32 {
    500
}

/// Whether `value` is a valid GCE label key or value (lowercase letters, digits, `_`, `-`).
pub fn is_label(value: &str, key: bool) -> bool {
    value.len() <= 63
        && (!key || value.starts_with(|c: char| c.is_ascii_lowercase()))
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl GceConfig {
    /// Reads and checks a config document, naming the field at fault.
    pub fn parse(doc: &serde_json::Value) -> Result<Self, ConfigError> {
        if doc.is_null() {
            return Err(ConfigError::new(
                "config",
                "a gce provider needs a config file (--config)",
            ));
        }
        let config: Self = cloudbrain_provider::parse_config(doc)?;
        if config.project.trim().is_empty() {
            return Err(ConfigError::new("project", "must not be empty"));
        }
        if config.zones.is_empty() || config.zones.iter().any(|z| z.trim().is_empty()) {
            return Err(ConfigError::new("zones", "at least one zone is required"));
        }
        validate_instance_types("machine_types", config.machine_types.keys())?;
        if config.machine_types.values().any(|t| t.trim().is_empty()) {
            return Err(ConfigError::new(
                "machine_types",
                "machine types must not be empty",
            ));
        }
        if config.image.trim().is_empty() {
            return Err(ConfigError::new("image", "must not be empty"));
        }
        if config.preemptible && config.spot {
            return Err(ConfigError::new(
                "spot",
                "choose preemptible or spot, not both",
            ));
        }
        if !config.scopes.is_empty() && config.service_account.is_none() {
            return Err(ConfigError::new("scopes", "scopes need a service_account"));
        }
        if let Some((k, v)) = config
            .labels
            .iter()
            .find(|(k, v)| !is_label(k, true) || !is_label(v, false))
        {
            return Err(ConfigError::new(
                "labels",
                format!("{k}={v} is not a valid GCE label"),
            ));
        }
        if config.labels.keys().any(|k| k.starts_with("cloudbrain-")) {
            return Err(ConfigError::new(
                "labels",
                "cloudbrain-* labels are reserved",
            ));
        }
        if config.ssh_user.is_empty()
            || !config
                .ssh_user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ConfigError::new("ssh_user", "must be a plain user name"));
        }
        if let Some(url) = &config.endpoint {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::new(
                    "endpoint",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if let GceCredentials::ServiceAccount { key } = &config.credentials {
            let key = key.expose();
            if key.get("private_key").and_then(|v| v.as_str()).is_none()
                || key.get("client_email").is_none()
            {
                return Err(ConfigError::new(
                    "credentials.key",
                    "must be a service-account key file",
                ));
            }
        }
        if !(1..=500).contains(&config.page_size) {
            return Err(ConfigError::new("page_size", "must be from 1 to 500"));
        }
        if config.operation_timeout_secs == 0 || config.operation_poll_ms == 0 {
            return Err(ConfigError::new(
                "operation_timeout_secs",
                "operation waits must be above 0",
            ));
        }
        config.offer()?;
        Ok(config)
    }

    /// What this config offers: its instance types, default type, call limits and
    /// placements (its zones).
    pub fn offer(&self) -> Result<Offer, ConfigError> {
        Offer::new(
            self.machine_types.keys(),
            self.default_instance_type.as_deref(),
            self.max_concurrency,
            self.rate_limit,
        )
        // A key goes into a running VM's `ssh-keys` metadata as it would at insert.
        .map(|offer| offer.placed_in(&self.zones).authorizing_keys(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> serde_json::Value {
        json!({"project": "p", "zones": ["us-central1-a"], "machine_types": {"standard": "e2-standard-2"}, "image": "ubuntu-2404-lts"})
    }

    #[test]
    fn defaults_are_narrow() {
        let config = GceConfig::parse(&base()).unwrap();
        assert!(config.scopes.is_empty() && config.service_account.is_none() && !config.public_ip);
        assert_eq!(config.credentials, GceCredentials::ApplicationDefault);
    }

    #[test]
    fn each_bad_field_is_named() {
        for (field, value) in [
            ("project", json!("")),
            ("zones", json!([])),
            ("machine_types", json!({})),
            ("image", json!("")),
            ("labels", json!({"Team": "x"})),
            (
                "scopes",
                json!(["https://www.googleapis.com/auth/cloud-platform"]),
            ),
            ("endpoint", json!("localhost")),
            ("page_size", json!(0)),
            ("ssh_user", json!("root; rm")),
        ] {
            let mut doc = base();
            doc[field] = value;
            assert_eq!(GceConfig::parse(&doc).unwrap_err().field, field);
        }
        let mut doc = base();
        doc["credentials"] = json!({"type": "service_account", "key": {}});
        assert_eq!(GceConfig::parse(&doc).unwrap_err().field, "credentials.key");
    }
}
