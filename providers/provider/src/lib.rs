//! The contract between the broker and a cloud: the [`Provider`] trait and the types it
//! speaks, and the [`Factory`] through which the broker's catalog knows a kind of cloud.
//!
//! A provider crate depends on this crate and its cloud's client only; it knows nothing of
//! the broker's database, its HTTP API or its job queue.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What the broker asks a provider to make: one machine for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// The image the machine boots from, as the client asked for it.
    pub image: String,
    /// The broker's instance type name (e.g. `standard`), mapped by the provider to its own.
    pub instance_type: String,
    /// One OpenSSH public key line to authorise on the machine, already validated.
    pub public_ssh_key: Option<String>,
    /// Where to make it: one of the config's [`Offer::placements`] (a zone, a subnet);
    /// `None` is the provider's own choice. The broker moves an instance to another
    /// placement after a [`ProviderError::Capacity`].
    #[serde(default)]
    pub placement: Option<String>,
}

impl InstanceSpec {
    /// The image to boot: the requested one, or `default` (the provider config's) when the
    /// request asks for `"default"`.
    pub fn image_or<'a>(&'a self, default: &'a str) -> &'a str {
        if self.image == "default" {
            default
        } else {
            &self.image
        }
    }

    /// The cloud's type for the requested instance type, from a config's table.
    pub fn cloud_type<'a>(
        &self,
        table: &'a std::collections::BTreeMap<String, String>,
    ) -> Result<&'a str, ProviderError> {
        table
            .get(&self.instance_type)
            .map(String::as_str)
            .ok_or_else(|| {
                ProviderError::Invalid(format!(
                    "instance type {:?} is not configured",
                    self.instance_type
                ))
            })
    }
}

/// Resolved names (an image name to an image id, say), each trusted for a while.
#[derive(Debug)]
pub struct TtlCache {
    ttl: Duration,
    entries: std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
}

impl TtlCache {
    /// A cache whose entries live for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// The fresh value for `key`, if any.
    pub fn get(&self, key: &str) -> Option<String> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(value, _)| value.clone())
    }

    /// Remembers `value` for `key` from now.
    pub fn put(&self, key: &str, value: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key.to_owned(),
                (value.to_owned(), std::time::Instant::now()),
            );
    }
}

/// The state of a machine as its cloud reports it, in the broker's vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloudState {
    /// Accepted by the cloud, not running yet.
    Starting,
    /// Up and reachable.
    Running,
    /// Being shut down or stopped.
    Terminating,
    /// Gone, or about to be.
    Terminated,
    /// Broken in a way the broker cannot fix by waiting; the text says why.
    Failed(String),
}

/// One machine as a provider sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudInstance {
    /// The broker's instance id the machine was made for (read back from its tags).
    pub id: Uuid,
    /// The cloud's own id of the machine.
    pub upstream_id: String,
    /// Where the machine is in its life.
    pub state: CloudState,
    /// The address to reach it at, once it has one.
    pub ip_address: Option<String>,
    /// When the cloud says the machine was launched, if it says.
    pub launched_at: Option<SystemTime>,
    /// What the provider says of the machine beyond this contract, by name (the EC2
    /// provider's `ecs`: its membership of an ECS cluster). The broker keeps it with the
    /// instance; the API shows the names it knows.
    pub details: Details,
}

/// A provider's details of a machine, by name.
pub type Details = std::collections::BTreeMap<String, serde_json::Value>;

/// Why a provider call failed; the kind decides what the broker does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The machine does not exist.
    #[error("not found")]
    NotFound,
    /// The cloud asked us to slow down; retry no sooner than `retry_after` when it says.
    #[error("throttled by the cloud")]
    Throttled {
        /// How long the cloud asked us to wait, when it said.
        retry_after: Option<Duration>,
    },
    /// The cloud has no room for this machine now: try later or elsewhere.
    #[error("no capacity: {0}")]
    Capacity(String),
    /// The request can never succeed as it is (bad image, bad type, no permission).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Anything that may succeed when tried again (timeouts, 5xx).
    #[error("transient error: {0}")]
    Transient(String),
}

/// A cloud the broker can make machines on.
///
/// The contract every implementation keeps, because the broker's jobs may run twice:
/// - `create` is idempotent per instance id: calling it again for the same id returns the
///   machine made the first time and never makes a second one.
/// - `list` returns every page, and only machines this provider config made (tagged with
///   its name), so the broker can find orphans without touching anyone else's machines.
/// - `destroy` of a machine that does not exist is success.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Makes (or finds, if it already exists) the machine for instance `id`.
    async fn create(&self, id: Uuid, spec: &InstanceSpec) -> Result<CloudInstance, ProviderError>;
    /// Reads the machine for instance `id`; [`ProviderError::NotFound`] when there is none.
    async fn get(&self, id: Uuid) -> Result<CloudInstance, ProviderError>;
    /// Lists every machine this provider config made, across all pages.
    async fn list(&self) -> Result<Vec<CloudInstance>, ProviderError>;
    /// Destroys the machine for instance `id`; a machine that is already gone is success.
    async fn destroy(&self, id: Uuid) -> Result<(), ProviderError>;
    /// Gets the machine of instance `id` ready to be destroyed (an ECS container instance
    /// set to DRAINING, its tasks let finish): [`Drain::Done`] when it may go now. The
    /// broker asks again until it is, or for at most the time the answer gives. Called
    /// again after `Done` it stays done; a machine that is gone is done.
    async fn drain(&self, id: Uuid) -> Result<Drain, ProviderError> {
        let _ = id;
        Ok(Drain::Done)
    }
    /// Lets OpenSSH public key `key` (one line, already validated) log in to the running
    /// machine of instance `id`, for a provider whose offer says
    /// [`Offer::authorizes_keys`]; doing it twice is the same as once.
    async fn authorize_key(&self, id: Uuid, key: &str) -> Result<(), ProviderError> {
        let _ = (id, key);
        Err(ProviderError::Invalid(
            "this provider cannot put a key on a running machine".into(),
        ))
    }
}

/// Where among `count` equal placements instance `id` starts: the same for every attempt,
/// spread evenly over instances.
pub fn first_placement(id: Uuid, count: usize) -> usize {
    usize::from(id.as_bytes()[0]) % count.max(1)
}

/// How far a machine is from being ready to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drain {
    /// Nothing runs on it any more: destroy it.
    Done,
    /// Work still runs on it.
    Draining {
        /// What is still running, for the logs and the instance's events.
        what: String,
        /// How long from the first ask the broker waits before destroying it anyway.
        at_most: Duration,
    },
}

/// One kind of cloud, as the broker's catalog knows it: its name, how a config document
/// for it is checked, and how a live provider is built from one.
#[async_trait]
pub trait Factory: Send + Sync {
    /// The kind's name, as stored in `providers.type` and given to `insert-provider --type`.
    fn kind(&self) -> &'static str;
    /// Checks a config document, naming the field at fault, and returns what it offers.
    fn check(&self, config: &serde_json::Value) -> Result<Offer, ConfigError>;
    /// The fields of a config document that hold credentials, as dotted paths
    /// (`secret_access_key`, `credentials.key`): an export never prints their values.
    fn secret_fields(&self) -> &'static [&'static str] {
        &[]
    }
    /// Builds the live provider named `name` from a config document.
    async fn build(
        &self,
        name: &str,
        config: &serde_json::Value,
    ) -> Result<Arc<dyn Provider>, ConfigError>;
}

/// What a provider config offers, readable by anyone: never its credentials. The broker
/// keeps it beside the sealed config, so answering a request never opens the seal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// The broker's instance type names it offers.
    pub instance_types: Vec<String>,
    /// The type a request gets when it names none, or `default`.
    pub default_instance_type: String,
    /// Limits on calls to its cloud.
    pub limits: CallLimits,
    /// Where it can make a machine (zones, subnets), in the order to try them; empty when
    /// it has no choice to offer.
    #[serde(default)]
    pub placements: Vec<String>,
    /// Whether its placements are equals (subnets spread over zones): each instance starts
    /// at the one [`first_placement`] picks for its id and goes round from there; else
    /// the order is a preference, the first tried first.
    #[serde(default)]
    pub spread: bool,
    /// Whether it can put an SSH key on a running machine ([`Provider::authorize_key`]),
    /// so a request with a key may take a machine booted before the key was known.
    #[serde(default)]
    pub authorizes_keys: bool,
}

impl Offer {
    /// The offer of a config with the instance types `offered`, the default type it
    /// names (if any) and its call limits; the error names the field at fault.
    pub fn new<'a>(
        offered: impl IntoIterator<Item = &'a String>,
        default_named: Option<&str>,
        max_concurrency: usize,
        rate_limit: f64,
    ) -> Result<Self, ConfigError> {
        let instance_types: Vec<String> = offered.into_iter().cloned().collect();
        let default_instance_type =
            default_instance_type("default_instance_type", default_named, &instance_types)?;
        let limits = CallLimits {
            max_concurrency,
            rate_limit,
        };
        limits.validate()?;
        Ok(Self {
            instance_types,
            default_instance_type,
            limits,
            placements: Vec::new(),
            spread: false,
            authorizes_keys: false,
        })
    }

    /// The offer, its placements equals (see [`Offer::spread`]).
    pub fn spreading(mut self) -> Self {
        self.spread = true;
        self
    }

    /// The offer, saying whether it can put a key on a running machine.
    pub fn authorizing_keys(mut self, can: bool) -> Self {
        self.authorizes_keys = can;
        self
    }

    /// The offer, with machines made in `placements`, tried in that order.
    pub fn placed_in(mut self, placements: &[String]) -> Self {
        self.placements = placements.to_vec();
        self
    }
}

/// A value that must never be printed: `Debug` shows `[redacted]`. It reads and writes as
/// the bare value, since configs holding it are stored sealed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps `value`.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The value, for the one place that must use it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A provider config that could not be accepted, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid provider config: {field}: {message}")]
pub struct ConfigError {
    /// The config field at fault (dotted for nested fields).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// Builds an error naming `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Reads a config document into `T`, naming the field at fault when it does not fit
/// (`boot_time_ms: expected an integer, got string "fast"`).
pub fn parse_config<T: serde::de::DeserializeOwned>(
    doc: &serde_json::Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(doc).map_err(|err| {
        let path = err.path().to_string();
        let field = if path.is_empty() || path == "." {
            "config".to_owned()
        } else {
            path
        };
        ConfigError::new(field, plain_serde_message(&err.into_inner().to_string()))
    })
}

/// serde's message in words an operator knows: `expected an integer, got string "x"`
/// rather than `invalid type: string "x", expected u64`.
fn plain_serde_message(message: &str) -> String {
    let message = message
        .split(" at line ")
        .next()
        .unwrap_or(message)
        .to_owned();
    let Some((got, expected)) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|rest| rest.split_once(", expected "))
    else {
        return message;
    };
    let expected = match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" | "i8" | "i16" | "i32" | "i64" | "isize" => {
            "an integer"
        }
        "f32" | "f64" => "a number",
        "a boolean" | "bool" => "true or false",
        other => other,
    };
    format!("expected {expected}, got {got}")
}

/// Limits on calls to one provider config's cloud API, read from its config.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CallLimits {
    /// Most calls in flight at once.
    pub max_concurrency: usize,
    /// Most calls started per second.
    pub rate_limit: f64,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            max_concurrency: 8,
            rate_limit: 10.0,
        }
    }
}

/// The default of [`CallLimits::max_concurrency`], for serde defaults of provider configs.
pub fn default_max_concurrency() -> usize {
    CallLimits::default().max_concurrency
}

/// The default of [`CallLimits::rate_limit`], for serde defaults of provider configs.
pub fn default_rate_limit() -> f64 {
    CallLimits::default().rate_limit
}

impl CallLimits {
    /// Checks the limits, naming the field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrency == 0 || self.max_concurrency > 1024 {
            return Err(ConfigError::new(
                "max_concurrency",
                "must be from 1 to 1024",
            ));
        }
        if !(self.rate_limit.is_finite() && self.rate_limit > 0.0 && self.rate_limit <= 100_000.0) {
            return Err(ConfigError::new(
                "rate_limit",
                "must be a number of calls per second above 0 and at most 100000",
            ));
        }
        Ok(())
    }
}

/// The instance type name that means "the provider's default" in a request.
pub const DEFAULT_TYPE_ALIAS: &str = "default";

/// The instance type a request gets when it names none, or `default`: the config's own
/// choice (`named`), else `standard` when offered (Cloud Brain booted its standard type
/// for anything but `premium`), else the first offered.
pub fn default_instance_type<'a>(
    field: &str,
    named: Option<&str>,
    offered: impl IntoIterator<Item = &'a String>,
) -> Result<String, ConfigError> {
    let offered: Vec<&String> = offered.into_iter().collect();
    if let Some(named) = named {
        if !offered.iter().any(|t| *t == named) {
            return Err(ConfigError::new(
                field,
                format!("{named:?} is not one of the instance types offered"),
            ));
        }
        return Ok(named.to_owned());
    }
    offered
        .iter()
        .find(|t| t.as_str() == "standard")
        .or_else(|| offered.first())
        .map(|t| (*t).clone())
        .ok_or_else(|| ConfigError::new(field, "at least one instance type is required"))
}

/// Checks an instance type table: at least one entry, no blank names, and not the name
/// `default`, which every request may use to mean the config's default type.
pub fn validate_instance_types<'a>(
    field: &str,
    names: impl IntoIterator<Item = &'a String>,
) -> Result<(), ConfigError> {
    let mut any = false;
    for name in names {
        any = true;
        if name.trim().is_empty() || name.len() > 64 {
            return Err(ConfigError::new(
                field,
                "instance type names must be 1 to 64 characters",
            ));
        }
        if name == DEFAULT_TYPE_ALIAS {
            return Err(ConfigError::new(
                field,
                "\"default\" is reserved: it means default_instance_type",
            ));
        }
    }
    if !any {
        return Err(ConfigError::new(
            field,
            "at least one instance type is required",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print_but_serialize_as_themselves() {
        let secret = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(serde_json::to_value(&secret).unwrap(), "hunter2");
        let back: Secret<String> = serde_json::from_value("hunter2".into()).unwrap();
        assert_eq!(back.expose(), "hunter2");
    }

    fn types(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn the_default_type_is_the_named_one_else_standard_else_the_first() {
        let offered = types(&["gpu", "premium", "standard"]);
        let pick = |named| default_instance_type("default_instance_type", named, &offered);
        assert_eq!(pick(Some("premium")).unwrap(), "premium");
        assert_eq!(pick(None).unwrap(), "standard");
        let err = pick(Some("huge")).unwrap_err();
        assert_eq!(err.field, "default_instance_type");
        let no_standard = types(&["small", "large"]);
        assert_eq!(
            default_instance_type("x", None, &no_standard).unwrap(),
            "small"
        );
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "only read through Debug")]
    struct Sample {
        boot_time_ms: u64,
        #[serde(default)]
        rate: f64,
        #[serde(default)]
        nested: Option<Nested>,
    }

    #[derive(Debug, Deserialize)]
    #[expect(dead_code, reason = "only read through Debug")]
    struct Nested {
        enabled: bool,
    }

    #[test]
    fn config_errors_name_the_field_in_plain_words() {
        let err = parse_config::<Sample>(&serde_json::json!({"boot_time_ms": "fast"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid provider config: boot_time_ms: expected an integer, got string "fast""#
        );
        let err = parse_config::<Sample>(&serde_json::json!({"boot_time_ms": 1, "rate": "x"}))
            .unwrap_err();
        assert_eq!(err.field, "rate");
        assert!(err.message.starts_with("expected a number"), "{err}");
        let err = parse_config::<Sample>(
            &serde_json::json!({"boot_time_ms": 1, "nested": {"enabled": 3}}),
        )
        .unwrap_err();
        assert_eq!(err.field, "nested.enabled");
        let err = parse_config::<Sample>(&serde_json::json!({})).unwrap_err();
        assert!(err.message.contains("boot_time_ms"), "{err}");
    }
}
