//! The EC2 provider's configuration, as stored (sealed) by `insert-provider --type ec2`.

use std::collections::BTreeMap;

use cloudbrain_provider::{validate_instance_types, ConfigError, Offer, Secret};
use serde::{Deserialize, Serialize};

/// Settings of one EC2 provider config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Config {
    /// The AWS region, e.g. `us-east-1`.
    pub region: String,
    /// Another endpoint than AWS's (an emulator, or a compatible API).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// An access key id; with `secret_access_key`, used instead of the standard AWS chain.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// The secret of `access_key_id`.
    #[serde(default)]
    pub secret_access_key: Option<Secret<String>>,
    /// A session token for temporary credentials.
    #[serde(default)]
    pub session_token: Option<Secret<String>>,
    /// Subnets to launch into; machines are spread across them.
    pub subnet_ids: Vec<String>,
    /// Security groups for every machine.
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    /// An IAM instance profile, by name or ARN.
    #[serde(default)]
    pub iam_instance_profile: Option<String>,
    /// An EC2 key pair name.
    #[serde(default)]
    pub key_name: Option<String>,
    /// The broker's instance type names mapped to EC2's, e.g. `{"standard": "t3.medium"}`.
    pub instance_types: BTreeMap<String, String>,
    /// The type a request gets when it names none or `default` (see
    /// [`cloudbrain_provider::default_instance_type`]).
    #[serde(default)]
    pub default_instance_type: Option<String>,
    /// An AMI id (`ami-…`) used as is, or an AMI name resolved to the newest match.
    pub image: String,
    /// Owners whose AMIs a name may resolve to (default: this account, `self`).
    #[serde(default = "default_image_owners")]
    pub image_owners: Vec<String>,
    /// An ECS cluster the machines join as container instances.
    #[serde(default)]
    pub ecs_cluster: Option<String>,
    /// With `ecs_cluster`: count a machine as running only once it registered (default true).
    #[serde(default = "yes")]
    pub require_ecs_registration: bool,
    /// The OS user EC2 Instance Connect lets a key in as (e.g. `ec2-user`, `ubuntu`); set,
    /// a request with a key may take a warm machine (the AMI needs the Instance Connect
    /// agent, and a key sent is good for 60 seconds).
    #[serde(default)]
    pub instance_connect_user: Option<String>,
    /// With `ecs_cluster`: how long a machine being taken away may keep running its tasks
    /// (DRAINING) before it is terminated anyway, in seconds (default 600).
    #[serde(default = "default_drain_timeout_secs")]
    pub drain_timeout_secs: u64,
    /// Extra tags on every machine and volume.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Most EC2/ECS API calls started per second, per process.
    #[serde(default = "cloudbrain_provider::default_rate_limit")]
    pub rate_limit: f64,
    /// Most EC2/ECS API calls in flight, per process.
    #[serde(default = "cloudbrain_provider::default_max_concurrency")]
    pub max_concurrency: usize,
}

fn default_image_owners() -> Vec<String> {
    vec!["self".to_owned()]
}

/// The longest `drain_timeout_secs`: a day.
pub const MAX_DRAIN_TIMEOUT_SECS: u64 = 86_400;

fn default_drain_timeout_secs() -> u64 {
    600
}

fn yes() -> bool {
    true
}

/// Tag keys the provider writes itself; extra tags may not override them.
pub const RESERVED_TAGS: [&str; 3] = ["cloudbrain:instance-id", "cloudbrain:provider", "Name"];

fn required(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    Ok(())
}

impl Ec2Config {
    /// Reads and checks a config document, naming the field at fault.
    pub fn parse(doc: &serde_json::Value) -> Result<Self, ConfigError> {
        if doc.is_null() {
            return Err(ConfigError::new(
                "config",
                "an ec2 provider needs a config file (--config)",
            ));
        }
        let config: Self = cloudbrain_provider::parse_config(doc)?;
        required("region", &config.region)?;
        required("image", &config.image)?;
        if config.subnet_ids.is_empty() || config.subnet_ids.iter().any(|s| s.trim().is_empty()) {
            return Err(ConfigError::new(
                "subnet_ids",
                "at least one subnet id is required",
            ));
        }
        if config
            .security_group_ids
            .iter()
            .any(|s| s.trim().is_empty())
        {
            return Err(ConfigError::new(
                "security_group_ids",
                "ids must not be empty",
            ));
        }
        validate_instance_types("instance_types", config.instance_types.keys())?;
        if let Some((name, _)) = config
            .instance_types
            .iter()
            .find(|(_, t)| t.trim().is_empty())
        {
            return Err(ConfigError::new(
                "instance_types",
                format!("{name} maps to an empty EC2 instance type"),
            ));
        }
        match (&config.access_key_id, &config.secret_access_key) {
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "secret_access_key",
                    "is required with access_key_id",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "access_key_id",
                    "is required with secret_access_key",
                ))
            }
            _ => {}
        }
        if let Some(url) = &config.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::new(
                    "endpoint_url",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if config.image_owners.is_empty() && !config.image.starts_with("ami-") {
            return Err(ConfigError::new(
                "image_owners",
                "an image name needs at least one owner to search",
            ));
        }
        if let Some(cluster) = &config.ecs_cluster {
            required("ecs_cluster", cluster)?;
        }
        if let Some(user) = &config.instance_connect_user {
            required("instance_connect_user", user)?;
        }
        if config.drain_timeout_secs > MAX_DRAIN_TIMEOUT_SECS {
            return Err(ConfigError::new(
                "drain_timeout_secs",
                format!("must be at most {MAX_DRAIN_TIMEOUT_SECS} (a day)"),
            ));
        }
        if let Some(key) = config
            .tags
            .keys()
            .find(|k| RESERVED_TAGS.contains(&k.as_str()) || k.starts_with("aws:"))
        {
            return Err(ConfigError::new("tags", format!("tag {key} is reserved")));
        }
        config.offer()?;
        Ok(config)
    }

    /// What this config offers: its instance types, default type, call limits, subnets
    /// and whether it puts keys on running machines.
    pub fn offer(&self) -> Result<Offer, ConfigError> {
        Offer::new(
            self.instance_types.keys(),
            self.default_instance_type.as_deref(),
            self.max_concurrency,
            self.rate_limit,
        )
        // Subnets are equals: instances spread over them, and move on after no room.
        .map(|offer| {
            offer
                .placed_in(&self.subnet_ids)
                .spreading()
                .authorizing_keys(self.instance_connect_user.is_some())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> serde_json::Value {
        json!({
            "region": "us-east-1",
            "subnet_ids": ["subnet-1"],
            "instance_types": {"standard": "t3.medium"},
            "image": "ami-12345678"
        })
    }

    #[test]
    fn a_minimal_config_takes_defaults() {
        let config = Ec2Config::parse(&base()).unwrap();
        assert_eq!(config.image_owners, ["self"]);
        assert!(config.require_ecs_registration);
        assert_eq!(
            config.offer().unwrap().limits,
            cloudbrain_provider::CallLimits::default()
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("region", json!("")),
            ("subnet_ids", json!([])),
            ("instance_types", json!({})),
            ("instance_types", json!({"standard": ""})),
            ("image", json!(" ")),
            ("endpoint_url", json!("localhost:5000")),
            ("tags", json!({"Name": "x"})),
            ("max_concurrency", json!(0)),
            ("rate_limit", json!(-1.0)),
            ("secret_access_key", json!(null)),
        ];
        for (field, value) in cases {
            let mut doc = base();
            if field == "secret_access_key" {
                doc["access_key_id"] = json!("AKIA");
            } else {
                doc[field] = value;
            }
            let err = Ec2Config::parse(&doc).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
        let mut doc = base();
        doc["subnet"] = json!("typo");
        assert!(Ec2Config::parse(&doc)
            .unwrap_err()
            .message
            .contains("subnet"));
        assert_eq!(
            Ec2Config::parse(&serde_json::Value::Null)
                .unwrap_err()
                .field,
            "config"
        );
    }
}
