//! A fake cloud that behaves like one, for development, tests and benchmarks.
//!
//! Its machines live in the memory of the process that made it, unless its config names a
//! `store_url`: then they live in that Postgres database, in a schema of their own
//! (`fake_cloud`), the way a real cloud keeps its own state, so every worker process sees
//! one cloud. Creates can be slow, machines boot after a while, and calls fail at
//! configured rates with seeded dice, so a run can be replayed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use cloudbrain_provider::{
    validate_instance_types, CloudInstance, CloudState, ConfigError, Factory, InstanceSpec, Offer,
    Provider, ProviderError, Secret,
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
    /// Zones it makes machines in, tried in this order (none: it offers no choice).
    #[serde(default)]
    pub zones: Vec<String>,
    /// Whether it puts a key on a running machine when asked (default true).
    #[serde(default = "yes")]
    pub authorize_keys: bool,
    /// Offerings with no room: creating one fails for lack of capacity, every time. Each
    /// names an instance type (`premium`), a zone (`@zone-a`) or both (`premium@zone-a`).
    #[serde(default)]
    pub no_capacity: Vec<String>,
    /// Seed of the error dice, so a run can be replayed.
    #[serde(default)]
    pub seed: u64,
    /// Most calls to this cloud in flight at once, per process.
    #[serde(default = "cloudbrain_provider::default_max_concurrency")]
    pub max_concurrency: usize,
    /// Most calls to this cloud started per second, per process.
    #[serde(default = "default_rate_limit")]
    pub rate_limit: f64,
    /// A Postgres database to keep the machines in, so that several processes see one
    /// cloud; without it they live in this process's memory.
    #[serde(default)]
    pub store_url: Option<Secret<String>>,
}

fn default_instance_types() -> Vec<String> {
    vec!["standard".to_owned(), "premium".to_owned()]
}

fn yes() -> bool {
    true
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
            zones: Vec::new(),
            authorize_keys: true,
            no_capacity: Vec::new(),
            seed: 0,
            max_concurrency: cloudbrain_provider::default_max_concurrency(),
            rate_limit: default_rate_limit(),
            store_url: None,
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
        for (field, rate) in [
            ("transient_error_rate", config.transient_error_rate),
            ("throttle_rate", config.throttle_rate),
            ("capacity_error_rate", config.capacity_error_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::new(field, "must be between 0 and 1"));
            }
        }
        for (i, full) in config.no_capacity.iter().enumerate() {
            let (kind, zone) = full.split_once('@').unwrap_or((full, ""));
            let known_type = kind.is_empty() || config.instance_types.iter().any(|t| t == kind);
            let known_zone = zone.is_empty() || config.zones.iter().any(|z| z == zone);
            if !known_type || !known_zone || full.is_empty() || full == "@" {
                return Err(ConfigError::new(
                    format!("no_capacity.{i}"),
                    "must name an offered instance type, @ and one of zones, or both",
                ));
            }
        }
        config.offer()?;
        Ok(config)
    }

    /// What this config offers: its instance types, default type, call limits and zones.
    pub fn offer(&self) -> Result<Offer, ConfigError> {
        Offer::new(
            &self.instance_types,
            self.default_instance_type.as_deref(),
            self.max_concurrency,
            self.rate_limit,
        )
        .map(|offer| {
            offer
                .placed_in(&self.zones)
                .authorizing_keys(self.authorize_keys)
        })
    }

    /// The zone a create for `spec` lands in, and whether that offering has room.
    fn place(&self, spec: &InstanceSpec) -> Result<Option<String>, ProviderError> {
        if !self.instance_types.contains(&spec.instance_type) {
            return Err(ProviderError::Invalid(format!(
                "fake cloud: instance type {:?} is not offered",
                spec.instance_type
            )));
        }
        let zone = match &spec.placement {
            Some(zone) if !self.zones.contains(zone) => {
                return Err(ProviderError::Invalid(format!(
                    "fake cloud: no zone {zone:?}"
                )))
            }
            Some(zone) => Some(zone.clone()),
            None => self.zones.first().cloned(),
        };
        let here = zone.as_deref().unwrap_or_default();
        let full = self.no_capacity.iter().any(|full| {
            let (kind, at) = full.split_once('@').unwrap_or((full, ""));
            (kind.is_empty() || kind == spec.instance_type) && (at.is_empty() || at == here)
        });
        if full {
            return Err(ProviderError::Capacity(format!(
                "fake cloud: no room for {} in zone {here:?}",
                spec.instance_type
            )));
        }
        Ok(zone)
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

/// The fake cloud as the broker's catalog knows it: kind `fake`.
pub struct FakeFactory;

#[async_trait]
impl Factory for FakeFactory {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn check(&self, config: &serde_json::Value) -> Result<Offer, ConfigError> {
        FakeConfig::parse(config)?.offer()
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &["store_url"]
    }

    async fn build(
        &self,
        name: &str,
        config: &serde_json::Value,
    ) -> Result<Arc<dyn Provider>, ConfigError> {
        Ok(Arc::new(FakeCloud::new(name, FakeConfig::parse(config)?)))
    }
}

/// One machine of the fake cloud.
#[derive(Debug, Clone)]
struct Machine {
    upstream_id: String,
    ip_address: String,
    ssh_key: Option<String>,
    created_at: SystemTime,
    boots_at: SystemTime,
}

impl Machine {
    fn new(id: Uuid, boot_time: Duration) -> Self {
        let bytes = id.as_bytes();
        let now = SystemTime::now();
        Self {
            upstream_id: format!("fake-{}", &id.simple().to_string()[..12]),
            // TEST-NET-1 (RFC 5737): addresses that are never routed anywhere.
            ip_address: format!("192.0.2.{}", 1 + bytes[15] % 254),
            ssh_key: None,
            created_at: now,
            boots_at: now + boot_time,
        }
    }

    fn seen(&self, id: Uuid, booted: bool) -> CloudInstance {
        CloudInstance {
            id,
            upstream_id: self.upstream_id.clone(),
            state: if booted {
                CloudState::Running
            } else {
                CloudState::Starting
            },
            ip_address: Some(self.ip_address.clone()),
            launched_at: Some(self.created_at),
            details: Default::default(),
        }
    }
}

/// Where the machines live.
enum Store {
    /// In this process.
    Memory(Mutex<BTreeMap<Uuid, Machine>>),
    /// In Postgres, shared by every process that names the same database.
    Postgres {
        url: Secret<String>,
        client: tokio::sync::Mutex<Option<Arc<tokio_postgres::Client>>>,
    },
}

/// One fake cloud account: the machines made under one provider config's name.
pub struct FakeCloud {
    name: String,
    config: FakeConfig,
    store: Store,
    dice: Mutex<StdRng>,
}

enum Call {
    Create,
    Other,
}

impl FakeCloud {
    /// A fake cloud named `name`, keeping its machines where `config` says.
    pub fn new(name: &str, config: FakeConfig) -> Self {
        let store = match &config.store_url {
            Some(url) => Store::Postgres {
                url: url.clone(),
                client: tokio::sync::Mutex::new(None),
            },
            None => Store::Memory(Mutex::new(BTreeMap::new())),
        };
        Self {
            name: name.to_owned(),
            dice: Mutex::new(StdRng::seed_from_u64(config.seed)),
            config,
            store,
        }
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

    /// Adds the machine for `id` unless it exists.
    async fn put(&self, id: Uuid, spec: &InstanceSpec) -> Result<(), ProviderError> {
        let machine = Machine {
            ssh_key: spec.public_ssh_key.clone(),
            ..Machine::new(id, Duration::from_millis(self.config.boot_time_ms))
        };
        match &self.store {
            Store::Memory(machines) => {
                let mut machines = machines.lock().unwrap_or_else(|e| e.into_inner());
                machines.entry(id).or_insert(machine);
                Ok(())
            }
            Store::Postgres { url, client } => {
                let client = connected(url, client).await?;
                client
                    .execute(
                        "INSERT INTO fake_cloud.machines \
                         (provider, instance_id, upstream_id, image, instance_type, ssh_key, ip_address, boots_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, clock_timestamp() + $8 * interval '1 millisecond') \
                         ON CONFLICT (provider, instance_id) DO NOTHING",
                        &[
                            &self.name,
                            &id,
                            &machine.upstream_id,
                            &spec.image,
                            &spec.instance_type,
                            &spec.public_ssh_key,
                            &machine.ip_address,
                            &(self.config.boot_time_ms as f64),
                        ],
                    )
                    .await
                    .map_err(transient)?;
                Ok(())
            }
        }
    }

    /// The machines whose id is `only` (or every machine), ordered by id.
    async fn read(&self, only: Option<Uuid>) -> Result<Vec<CloudInstance>, ProviderError> {
        match &self.store {
            Store::Memory(machines) => {
                let machines = machines.lock().unwrap_or_else(|e| e.into_inner());
                let now = SystemTime::now();
                Ok(machines
                    .iter()
                    .filter(|(id, _)| only.is_none_or(|only| only == **id))
                    .map(|(id, m)| m.seen(*id, now >= m.boots_at))
                    .collect())
            }
            Store::Postgres { url, client } => {
                let client = connected(url, client).await?;
                let rows = client
                    .query(
                        "SELECT instance_id, upstream_id, ip_address, ssh_key, created_at, \
                         clock_timestamp() >= boots_at AS booted FROM fake_cloud.machines \
                         WHERE provider = $1 AND ($2::uuid IS NULL OR instance_id = $2) \
                         ORDER BY instance_id",
                        &[&self.name, &only],
                    )
                    .await
                    .map_err(transient)?;
                Ok(rows
                    .iter()
                    .map(|row| {
                        let machine = Machine {
                            upstream_id: row.get("upstream_id"),
                            ip_address: row.get("ip_address"),
                            ssh_key: row.get("ssh_key"),
                            created_at: row.get("created_at"),
                            boots_at: SystemTime::UNIX_EPOCH,
                        };
                        machine.seen(row.get("instance_id"), row.get("booted"))
                    })
                    .collect())
            }
        }
    }

    /// Removes the machine for `id`, if there is one.
    async fn remove(&self, id: Uuid) -> Result<(), ProviderError> {
        match &self.store {
            Store::Memory(machines) => {
                machines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Ok(())
            }
            Store::Postgres { url, client } => {
                let client = connected(url, client).await?;
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
    }
}

/// A connected client to the Postgres store, reconnecting when the last one broke, with
/// the store's schema made on first use.
async fn connected(
    url: &Secret<String>,
    slot: &tokio::sync::Mutex<Option<Arc<tokio_postgres::Client>>>,
) -> Result<Arc<tokio_postgres::Client>, ProviderError> {
    let mut slot = slot.lock().await;
    if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
        return Ok(client.clone());
    }
    let (client, connection) = tokio_postgres::connect(url.expose(), tokio_postgres::NoTls)
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

fn transient(err: tokio_postgres::Error) -> ProviderError {
    ProviderError::Transient(format!("fake cloud unreachable: {err}"))
}

#[async_trait]
impl Provider for FakeCloud {
    async fn create(&self, id: Uuid, spec: &InstanceSpec) -> Result<CloudInstance, ProviderError> {
        self.dice(Call::Create)?;
        self.config.place(spec)?;
        if self.config.invalid_images.contains(&spec.image) {
            return Err(ProviderError::Invalid(format!(
                "fake cloud: image {:?} does not exist",
                spec.image
            )));
        }
        self.put(id, spec).await?;
        // The machine exists from here on, as with a cloud whose answer is slow to come.
        tokio::time::sleep(Duration::from_millis(self.config.create_latency_ms)).await;
        self.get(id).await
    }

    async fn get(&self, id: Uuid) -> Result<CloudInstance, ProviderError> {
        self.dice(Call::Other)?;
        self.read(Some(id))
            .await?
            .pop()
            .ok_or(ProviderError::NotFound)
    }

    async fn list(&self) -> Result<Vec<CloudInstance>, ProviderError> {
        self.dice(Call::Other)?;
        self.read(None).await
    }

    async fn destroy(&self, id: Uuid) -> Result<(), ProviderError> {
        self.dice(Call::Other)?;
        self.remove(id).await
    }

    async fn authorize_key(&self, id: Uuid, key: &str) -> Result<(), ProviderError> {
        self.dice(Call::Other)?;
        if !self.config.authorize_keys {
            return Err(ProviderError::Invalid(
                "fake cloud: keys are not put on running machines here".into(),
            ));
        }
        let found = match &self.store {
            Store::Memory(machines) => {
                let mut machines = machines.lock().unwrap_or_else(|e| e.into_inner());
                machines
                    .get_mut(&id)
                    .map(|m| m.ssh_key = Some(key.to_owned()))
                    .is_some()
            }
            Store::Postgres { url, client } => {
                let client = connected(url, client).await?;
                client
                    .execute(
                        "UPDATE fake_cloud.machines SET ssh_key = $3 \
                         WHERE provider = $1 AND instance_id = $2",
                        &[&self.name, &id, &key],
                    )
                    .await
                    .map_err(transient)?
                    == 1
            }
        };
        if found {
            Ok(())
        } else {
            Err(ProviderError::NotFound)
        }
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

    #[tokio::test]
    async fn machines_in_memory_boot_after_their_time_and_go_when_destroyed() {
        let config = FakeConfig {
            boot_time_ms: 50,
            ..FakeConfig::default()
        };
        let cloud = FakeCloud::new("f", config);
        let spec = InstanceSpec {
            image: "ubuntu".into(),
            instance_type: "standard".into(),
            public_ssh_key: None,
            placement: None,
        };
        let id = Uuid::new_v4();
        let made = cloud.create(id, &spec).await.unwrap();
        assert_eq!(made.state, CloudState::Starting);
        assert_eq!(
            cloud.create(id, &spec).await.unwrap().upstream_id,
            made.upstream_id
        );
        assert_eq!(
            cloud.list().await.unwrap().len(),
            1,
            "a create is idempotent"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(cloud.get(id).await.unwrap().state, CloudState::Running);
        cloud.destroy(id).await.unwrap();
        cloud.destroy(id).await.unwrap();
        assert_eq!(cloud.get(id).await, Err(ProviderError::NotFound));
        assert!(cloud.list().await.unwrap().is_empty());
    }

    #[test]
    fn the_store_url_is_never_printed() {
        let config =
            FakeConfig::parse(&json!({"store_url": "postgres://cb:s3cret@db/cb"})).unwrap();
        assert!(!format!("{config:?}").contains("s3cret"), "{config:?}");
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
            let cloud = FakeCloud::new("f", config.clone());
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
