//! A fake cloud that behaves like one, for development, tests and benchmarks.
//!
//! Its machines live in Postgres, in a schema of its own (`fake_cloud`), the way a real
//! cloud keeps its own state: every worker process sees one cloud, and a test can count
//! machines. Creates can be slow, machines boot after a while, and calls fail at
//! configured rates with seeded dice, so a run can be replayed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use cloudbrain_provider::{
    validate_instance_types, CallLimits, CloudInstance, CloudState, ConfigError, InstanceSpec,
    Provider, ProviderError,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Settings of one fake cloud, as stored (sealed) in the `providers` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeConfig {
    /// The broker's instance type names this cloud offers.
    #[serde(default = "default_instance_types")]
    pub instance_types: Vec<String>,
    /// The type a request gets when it names none or `default` (see
    /// [`cloudbrain_provider::default_instance_type`]).
    #[serde(default)]
    pub default_instance_type: Option<String>,
    /// How long a create call takes, in milliseconds (the machine exists from its start).
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
    /// How long a throttled caller is told to wait, in milliseconds.
    #[serde(default = "default_retry_after_ms")]
    pub throttle_retry_after_ms: u64,
    /// Share of creates (0 to 1) that fail for lack of capacity.
    #[serde(default)]
    pub capacity_error_rate: f64,
    /// Images that do not exist: creating from one is refused as invalid.
    #[serde(default)]
    pub invalid_images: Vec<String>,
    /// Seed of the error dice, so a run can be replayed.
    #[serde(default)]
    pub seed: u64,
    /// Most calls to this cloud in flight at once, per process.
    #[serde(default = "cloudbrain_provider::default_max_concurrency")]
    pub max_concurrency: usize,
    /// Most calls to this cloud started per second, per process.
    #[serde(default = "default_rate_limit")]
    pub rate_limit: f64,
}

fn default_instance_types() -> Vec<String> {
    vec!["standard".to_owned(), "premium".to_owned()]
}

fn default_boot_time_ms() -> u64 {
    3000
}

fn default_retry_after_ms() -> u64 {
    1000
}

fn default_rate_limit() -> f64 {
    // The fake cloud has no API quota to protect; a high default keeps tests and
    // benchmarks measuring the broker rather than the limiter.
    1000.0
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            instance_types: default_instance_types(),
            default_instance_type: None,
            create_latency_ms: 0,
            boot_time_ms: default_boot_time_ms(),
            transient_error_rate: 0.0,
            throttle_rate: 0.0,
            throttle_retry_after_ms: default_retry_after_ms(),
            capacity_error_rate: 0.0,
            invalid_images: Vec::new(),
            seed: 0,
            max_concurrency: cloudbrain_provider::default_max_concurrency(),
            rate_limit: default_rate_limit(),
        }
    }
}

impl FakeConfig {
    /// Reads and checks a config document; an empty document means every default.
    pub fn parse(doc: &serde_json::Value) -> Result<Self, ConfigError> {
        let config: Self = if doc.is_null() {
            Self::default()
        } else {
            cloudbrain_provider::parse_config(doc)?
        };
        validate_instance_types("instance_types", &config.instance_types)?;
        config.default_type()?;
        for (field, rate) in [
            ("transient_error_rate", config.transient_error_rate),
            ("throttle_rate", config.throttle_rate),
            ("capacity_error_rate", config.capacity_error_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::new(field, "must be between 0 and 1"));
            }
        }
        config.limits().validate()?;
        Ok(config)
    }

    /// The type a request gets when it names none or `default`.
    pub fn default_type(&self) -> Result<String, ConfigError> {
        cloudbrain_provider::default_instance_type(
            "default_instance_type",
            self.default_instance_type.as_deref(),
            &self.instance_types,
        )
    }

    /// The call limits this config sets.
    pub fn limits(&self) -> CallLimits {
        CallLimits {
            max_concurrency: self.max_concurrency,
            rate_limit: self.rate_limit,
        }
    }
}

/// The advisory lock key that keeps concurrent first uses of the fake cloud's store from
/// racing on `CREATE TABLE`.
pub const SCHEMA_LOCK: i64 = 7_368_262_710;

/// The fake cloud's state, created on first use under [`SCHEMA_LOCK`].
const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS fake_cloud;
CREATE TABLE IF NOT EXISTS fake_cloud.machines (
    provider TEXT NOT NULL,
    instance_id UUID NOT NULL,
    upstream_id TEXT NOT NULL,
    image TEXT NOT NULL,
    instance_type TEXT NOT NULL,
    ssh_key TEXT,
    ip_address TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    boots_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (provider, instance_id)
);";

/// One fake cloud account: the machines made under one provider config's name.
pub struct FakeCloud {
    name: String,
    config: FakeConfig,
    database_url: String,
    client: tokio::sync::Mutex<Option<Arc<tokio_postgres::Client>>>,
    dice: Mutex<StdRng>,
}

enum Call {
    Create,
    Other,
}

impl FakeCloud {
    /// A fake cloud named `name` keeping its machines in the database at `database_url`.
    pub fn new(name: &str, config: FakeConfig, database_url: &str) -> Self {
        Self {
            name: name.to_owned(),
            dice: Mutex::new(StdRng::seed_from_u64(config.seed)),
            config,
            database_url: database_url.to_owned(),
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// A connected client, reconnecting when the last one broke.
    async fn client(&self) -> Result<Arc<tokio_postgres::Client>, ProviderError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let (client, connection) =
            tokio_postgres::connect(&self.database_url, tokio_postgres::NoTls)
                .await
                .map_err(transient)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); {SCHEMA} COMMIT;"
            ))
            .await
            .map_err(transient)?;
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Rolls the dice for one call: an injected failure, or `Ok` to go on.
    fn dice(&self, call: Call) -> Result<(), ProviderError> {
        let mut rng = self.dice.lock().unwrap_or_else(|e| e.into_inner());
        let roll: f64 = rng.random();
        let mut edge = self.config.throttle_rate;
        if roll < edge {
            return Err(ProviderError::Throttled {
                retry_after: Some(Duration::from_millis(self.config.throttle_retry_after_ms)),
            });
        }
        edge += self.config.transient_error_rate;
        if roll < edge {
            return Err(ProviderError::Transient(
                "fake cloud: internal error (injected)".into(),
            ));
        }
        if let Call::Create = call {
            edge += self.config.capacity_error_rate;
            if roll < edge {
                return Err(ProviderError::Capacity(
                    "fake cloud: no capacity for this instance type (injected)".into(),
                ));
            }
        }
        Ok(())
    }

    fn machine(row: &tokio_postgres::Row) -> CloudInstance {
        let booted: bool = row.get("booted");
        CloudInstance {
            id: row.get("instance_id"),
            upstream_id: row.get("upstream_id"),
            state: if booted {
                CloudState::Running
            } else {
                CloudState::Starting
            },
            ip_address: Some(row.get("ip_address")),
            launched_at: Some(row.get::<_, SystemTime>("created_at")),
            ecs: None,
        }
    }
}

fn transient(err: tokio_postgres::Error) -> ProviderError {
    ProviderError::Transient(format!("fake cloud unreachable: {err}"))
}

const SELECT: &str = "SELECT instance_id, upstream_id, ip_address, created_at, \
                      clock_timestamp() >= boots_at AS booted FROM fake_cloud.machines";

#[async_trait]
impl Provider for FakeCloud {
    async fn create(&self, id: Uuid, spec: &InstanceSpec) -> Result<CloudInstance, ProviderError> {
        self.dice(Call::Create)?;
        if self.config.invalid_images.contains(&spec.image) {
            return Err(ProviderError::Invalid(format!(
                "fake cloud: image {:?} does not exist",
                spec.image
            )));
        }
        let client = self.client().await?;
        let bytes = id.as_bytes();
        // TEST-NET-1 (RFC 5737): addresses that are never routed anywhere.
        let ip = format!("192.0.2.{}", 1 + bytes[15] % 254);
        client
            .execute(
                "INSERT INTO fake_cloud.machines \
                 (provider, instance_id, upstream_id, image, instance_type, ssh_key, ip_address, boots_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, clock_timestamp() + $8 * interval '1 millisecond') \
                 ON CONFLICT (provider, instance_id) DO NOTHING",
                &[
                    &self.name,
                    &id,
                    &format!("fake-{}", &id.simple().to_string()[..12]),
                    &spec.image,
                    &spec.instance_type,
                    &spec.public_ssh_key,
                    &ip,
                    &(self.config.boot_time_ms as f64),
                ],
            )
            .await
            .map_err(transient)?;
        // The machine exists from here on, as with a cloud whose answer is slow to come.
        tokio::time::sleep(Duration::from_millis(self.config.create_latency_ms)).await;
        self.get(id).await
    }

    async fn get(&self, id: Uuid) -> Result<CloudInstance, ProviderError> {
        self.dice(Call::Other)?;
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("{SELECT} WHERE provider = $1 AND instance_id = $2"),
                &[&self.name, &id],
            )
            .await
            .map_err(transient)?;
        row.as_ref()
            .map(Self::machine)
            .ok_or(ProviderError::NotFound)
    }

    async fn list(&self) -> Result<Vec<CloudInstance>, ProviderError> {
        self.dice(Call::Other)?;
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("{SELECT} WHERE provider = $1 ORDER BY instance_id"),
                &[&self.name],
            )
            .await
            .map_err(transient)?;
        Ok(rows.iter().map(Self::machine).collect())
    }

    async fn destroy(&self, id: Uuid) -> Result<(), ProviderError> {
        self.dice(Call::Other)?;
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM fake_cloud.machines WHERE provider = $1 AND instance_id = $2",
                &[&self.name, &id],
            )
            .await
            .map_err(transient)?;
        Ok(())
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
        let err = FakeConfig::parse(&json!({"max_concurrency": 0})).unwrap_err();
        assert_eq!(err.field, "max_concurrency");
        let err = FakeConfig::parse(&json!({"bogus": 1})).unwrap_err();
        assert!(err.message.contains("bogus"), "{err}");
    }

    #[test]
    fn the_same_seed_fails_the_same_calls() {
        let config = FakeConfig {
            transient_error_rate: 0.3,
            throttle_rate: 0.2,
            capacity_error_rate: 0.1,
            seed: 42,
            ..FakeConfig::default()
        };
        let outcomes = || {
            let cloud = FakeCloud::new("f", config.clone(), "postgres://unused");
            (0..200)
                .map(|_| cloud.dice(Call::Create).err())
                .collect::<Vec<_>>()
        };
        let first = outcomes();
        assert_eq!(first, outcomes());
        let failed = first.iter().filter(|o| o.is_some()).count();
        assert!(
            (90..150).contains(&failed),
            "{failed} of 200 failed at a 60% rate"
        );
        assert!(first
            .iter()
            .any(|o| matches!(o, Some(ProviderError::Capacity(_)))));
        assert!(first
            .iter()
            .any(|o| matches!(o, Some(ProviderError::Throttled { .. }))));
    }
}
