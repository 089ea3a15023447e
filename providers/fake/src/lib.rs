//! The fake cloud's configuration.
//!
//! The fake cloud's machines (kept in a Postgres schema of its own) are not built yet: this
//! crate only reads and checks the config that `insert-provider --type fake` stores.

use cloudbrain_provider::{validate_instance_types, ConfigError};
use serde::{Deserialize, Serialize};

/// Settings of one fake cloud, as stored (sealed) in the `providers` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeConfig {
    /// The broker's instance type names this cloud offers.
    #[serde(default = "default_instance_types")]
    pub instance_types: Vec<String>,
    /// How long a create call takes, in milliseconds.
    #[serde(default)]
    pub create_latency_ms: u64,
    /// How long a machine stays pending before it runs, in milliseconds.
    #[serde(default = "default_boot_time_ms")]
    pub boot_time_ms: u64,
    /// Share of calls (0 to 1) that fail with a transient error.
    #[serde(default)]
    pub transient_error_rate: f64,
    /// Share of calls (0 to 1) that are throttled.
    #[serde(default)]
    pub throttle_rate: f64,
    /// Share of creates (0 to 1) that fail for lack of capacity.
    #[serde(default)]
    pub capacity_error_rate: f64,
    /// Seed of the error dice, so a run can be replayed.
    #[serde(default)]
    pub seed: u64,
}

fn default_instance_types() -> Vec<String> {
    vec!["standard".to_owned(), "premium".to_owned()]
}

fn default_boot_time_ms() -> u64 {
    3000
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            instance_types: default_instance_types(),
            create_latency_ms: 0,
            boot_time_ms: default_boot_time_ms(),
            transient_error_rate: 0.0,
            throttle_rate: 0.0,
            capacity_error_rate: 0.0,
            seed: 0,
        }
    }
}

impl FakeConfig {
    /// Reads and checks a config document; an empty document means every default.
    pub fn parse(doc: &serde_json::Value) -> Result<Self, ConfigError> {
        let config: Self = if doc.is_null() {
            Self::default()
        } else {
            serde_json::from_value(doc.clone()).map_err(|e| ConfigError::from_serde(&e))?
        };
        validate_instance_types("instance_types", &config.instance_types)?;
        for (field, rate) in [
            ("transient_error_rate", config.transient_error_rate),
            ("throttle_rate", config.throttle_rate),
            ("capacity_error_rate", config.capacity_error_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::new(field, "must be between 0 and 1"));
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_config_offers_standard_and_premium() {
        let config = FakeConfig::parse(&serde_json::Value::Null).unwrap();
        assert_eq!(config.instance_types, ["standard", "premium"]);
    }

    #[test]
    fn bad_fields_are_named() {
        let err = FakeConfig::parse(&json!({"throttle_rate": 2.0})).unwrap_err();
        assert_eq!(err.field, "throttle_rate");
        let err = FakeConfig::parse(&json!({"instance_types": []})).unwrap_err();
        assert_eq!(err.field, "instance_types");
        let err = FakeConfig::parse(&json!({"bogus": 1})).unwrap_err();
        assert!(err.message.contains("bogus"), "{err}");
    }
}
