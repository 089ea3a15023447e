//! The fleet as a document: provider configs and pools, read from YAML (or JSON), compared
//! with what is stored to make a [`Plan`] (pure), and applied in one transaction; and the
//! stored fleet written back out, secrets as references, so that applying an export
//! changes nothing.

use std::collections::BTreeMap;

use diesel_async::{AsyncConnection, AsyncPgConnection};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::model::PoolRow;
use super::offerings::{fallbacks_of, Fallback};
use super::pools::{self, PoolSpec};
use super::providers::ProviderPolicy;
use super::providers::{self as stored, InsertProviderError};
use super::BrokerError;
use crate::crypto::SecretKey;
use crate::providers::catalog;

/// A fleet document: provider configs and pools, each by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// Provider configs by name.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderEntry>,
    /// Pools by name.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolEntry>,
}

/// One provider config: its kind and its config document. A value written
/// `{"$env": "NAME"}` or `{"$file": "path"}` is read from there when the fleet is applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderEntry {
    /// The kind of cloud (`fake`, `ec2`, `gce`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The config document.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub config: Value,
    /// The longest an instance on it lives, in seconds (absent: the broker's longest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_secs: Option<u64>,
    /// The offerings its instances fall back to, in order, when it has no room.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<Fallback>,
}

/// One pool's shape and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolEntry {
    /// The provider config its machines run on.
    pub provider: String,
    /// The image they boot.
    pub image: String,
    /// The instance type (the provider's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Machines kept booted and unassigned.
    #[serde(default)]
    pub min_idle: u32,
    /// Most live instances of the pool.
    pub max_size: u32,
    /// The longest one of its machines lives, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_secs: Option<u64>,
    /// The offerings to fall back to, in order, when its own shape has no room.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<Fallback>,
}

/// A fleet document that could not be read: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{field}: {message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct FleetError {
    /// The line at fault, when it is known.
    pub line: Option<usize>,
    /// The field at fault, as a dotted path (`pools.ci.min_idle`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl Fleet {
    /// Reads a fleet document, YAML or JSON (read as JSON, strictly, when it is JSON:
    /// YAML readers differ on JSON's escapes); the error names the line and the field.
    /// An empty document is refused: it is more likely a mistake than a wish for no
    /// fleet, which is written `{}`.
    pub fn parse(text: &str) -> Result<Self, FleetError> {
        if text.trim().is_empty() {
            return Err(FleetError {
                line: None,
                field: ".".to_owned(),
                message: "the document is empty (a fleet of nothing is written {})".to_owned(),
            });
        }
        if let Ok(value) = crate::json::from_str(text) {
            return serde_path_to_error::deserialize(value).map_err(|error| {
                let field = error.path().to_string();
                FleetError {
                    line: locate(text, &field),
                    message: error.into_inner().to_string(),
                    field,
                }
            });
        }
        let deserializer = serde_norway::Deserializer::from_str(text);
        serde_path_to_error::deserialize(deserializer).map_err(|error| {
            let field = error.path().to_string();
            let inner = error.into_inner();
            let line = inner.location().map(|at| at.line());
            let message = inner.to_string();
            // The library's message ends with its own "at line N column M".
            let message = message
                .split(" at line ")
                .next()
                .unwrap_or(&message)
                .to_owned();
            FleetError {
                line: line.or_else(|| locate(text, &field)),
                field,
                message,
            }
        })
    }
}

/// The line of the key at dotted `path` in a YAML document, found by indentation.
pub fn locate(text: &str, path: &str) -> Option<usize> {
    let mut keys = path.split('.').filter(|k| !k.is_empty()).peekable();
    let mut indent: Option<usize> = None;
    let mut found = None;
    for (number, line) in text.lines().enumerate() {
        let Some(key) = keys.peek() else { break };
        let trimmed = line.trim_start();
        let depth = line.len() - trimmed.len();
        if indent.is_some_and(|i| depth <= i) && !trimmed.is_empty() {
            // Left the block the previous key opened without finding this one.
            if !trimmed.starts_with('#') {
                return found;
            }
        }
        let named = trimmed
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with(':'))
            || trimmed
                .strip_prefix(&format!("\"{key}\""))
                .is_some_and(|rest| rest.trim_start().starts_with(':'));
        if named && indent.is_none_or(|i| depth > i) {
            found = Some(number + 1);
            indent = Some(depth);
            keys.next();
        }
    }
    found
}

/// Reads the value a reference names: `{"$env": NAME}` or `{"$file": PATH}`.
pub trait Secrets {
    /// The text the reference at `path` of provider `provider`'s config names; the error
    /// says what is missing.
    fn read(&self, provider: &str, path: &str, reference: &Reference) -> Result<String, String>;
}

/// The secrets already stored: a reference reads as the value stored at its field, so a
/// document read back from the API (its secrets as references) applies unchanged; a
/// reference at a field with nothing stored is refused. What the API uses: the server reads
/// no environment or file of its own for a client.
pub struct StoredSecrets(BTreeMap<(String, String), Value>);

impl StoredSecrets {
    /// The secrets of the provider configs stored now.
    pub async fn load(conn: &mut AsyncPgConnection, key: &SecretKey) -> Result<Self, BrokerError> {
        let (providers, _) = current(conn, key).await?;
        let mut known = BTreeMap::new();
        for (name, c) in providers {
            let secret_fields = catalog::find(&c.kind)
                .map(|f| f.secret_fields())
                .unwrap_or_default();
            let paths = c
                .refs
                .keys()
                .cloned()
                .chain(secret_fields.iter().map(|p| (*p).to_owned()));
            for path in paths {
                let value = path
                    .split('.')
                    .try_fold(&c.config, |at, key| at.get(key))
                    .cloned();
                if let Some(value) = value {
                    known.insert((name.clone(), path), value);
                }
            }
        }
        Ok(Self(known))
    }
}

impl Secrets for StoredSecrets {
    fn read(&self, provider: &str, path: &str, _: &Reference) -> Result<String, String> {
        match self.0.get(&(provider.to_owned(), path.to_owned())) {
            Some(Value::String(text)) => Ok(text.clone()),
            Some(other) => Ok(other.to_string()),
            None => Err(
                "through the API a reference keeps the value stored at its field, and nothing \
                 is stored here; give the value, or apply the file with `cloudbrain apply`, \
                 which reads the environment and files"
                    .to_owned(),
            ),
        }
    }
}

/// Where a secret is kept: `{"$env": "NAME"}` or `{"$file": "path"}` (the `$` keeps a
/// config's own fields, a tag named `env` say, from reading as references).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Reference {
    /// An environment variable of the process that applies the fleet.
    #[serde(rename = "$env")]
    Env(String),
    /// A file on the machine that applies the fleet.
    #[serde(rename = "$file")]
    File(String),
}

/// A provider config with its references read: the document to store, and the references
/// by dotted path.
fn resolve(
    provider: &str,
    config: &Value,
    secrets: &dyn Secrets,
    at: &str,
    refs: &mut BTreeMap<String, Reference>,
) -> Result<Value, FleetError> {
    if let Ok(reference) = Reference::deserialize(config) {
        let text = secrets
            .read(provider, at, &reference)
            .map_err(|message| FleetError {
                line: None,
                field: at.to_owned(),
                message,
            })?;
        refs.insert(at.to_owned(), reference);
        // A reference to a JSON object (a key file, say) stands for that object.
        return Ok(match serde_json::from_str::<Value>(&text) {
            Ok(json) if json.is_object() => json,
            _ => Value::String(text.trim_end_matches('\n').to_owned()),
        });
    }
    Ok(match config {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (key, value) in map {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                out.insert(key.clone(), resolve(provider, value, secrets, &path, refs)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

/// A provider config as stored: its kind, its config and the references of its secrets.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredConfig {
    /// The kind of cloud.
    pub kind: String,
    /// The config document, opened.
    pub config: Value,
    /// Where its secrets came from, by dotted path.
    pub refs: BTreeMap<String, Reference>,
    /// What it says beyond its cloud's config.
    pub policy: ProviderPolicy,
}

/// What applying a fleet changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Provider configs to make: name, kind, config, references.
    pub create_providers: Vec<(String, StoredConfig)>,
    /// Provider configs to change: name, new config, the fields that change.
    pub update_providers: Vec<(String, StoredConfig, Vec<String>)>,
    /// Provider configs to delete (with prune).
    pub delete_providers: Vec<String>,
    /// Pools to make.
    pub create_pools: Vec<(String, PoolEntry)>,
    /// Pools to change, with each changed field as `field: old → new`.
    pub update_pools: Vec<(String, PoolEntry, Vec<String>)>,
    /// Pools to delete (with prune).
    pub delete_pools: Vec<String>,
}

impl Plan {
    /// True when applying changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }

    /// The plan, a line per change, field by field; secrets are named, never shown.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (name, c) in &self.create_providers {
            let fields: Vec<&String> = c
                .config
                .as_object()
                .map(|m| m.keys().collect())
                .unwrap_or_default();
            let fields: Vec<&str> = fields.iter().map(|f| f.as_str()).collect();
            lines.push(format!(
                "create provider {name} ({}): {}",
                c.kind,
                fields.join(", ")
            ));
        }
        for (name, _, changed) in &self.update_providers {
            lines.push(format!("update provider {name}: {}", changed.join(", ")));
        }
        for (name, pool) in &self.create_pools {
            lines.push(format!(
                "create pool {name}: provider {}, image {}, instance_type {}, min_idle {}, max_size {}, max_lifetime_secs {}",
                pool.provider,
                pool.image,
                pool.instance_type.as_deref().unwrap_or("(default)"),
                pool.min_idle,
                pool.max_size,
                pool.max_lifetime_secs.map_or("(default)".to_owned(), |s| s.to_string())
            ));
        }
        for (name, _, changed) in &self.update_pools {
            lines.push(format!("update pool {name}: {}", changed.join(", ")));
        }
        for name in &self.delete_pools {
            lines.push(format!("delete pool {name}"));
        }
        for name in &self.delete_providers {
            lines.push(format!("delete provider {name}"));
        }
        lines
    }
}

/// The dotted paths at which `a` and `b` differ.
fn differences(a: &Value, b: &Value, at: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for key in keys {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                differences(
                    x.get(key).unwrap_or(&Value::Null),
                    y.get(key).unwrap_or(&Value::Null),
                    &path,
                    out,
                );
            }
        }
        _ if a != b => out.push(at.to_owned()),
        _ => {}
    }
}

/// A provider's policy fields that differ, as `field old → new`.
fn policy_changes(have: &ProviderPolicy, want: &ProviderPolicy) -> Vec<String> {
    let lifetime = |p: &ProviderPolicy| {
        p.max_lifetime_secs
            .map_or("(default)".to_owned(), |s| s.to_string())
    };
    let fallbacks = |p: &ProviderPolicy| serde_json::to_string(&p.fallbacks).unwrap_or_default();
    [
        ("max_lifetime_secs", lifetime(have), lifetime(want)),
        ("fallbacks", fallbacks(have), fallbacks(want)),
    ]
    .into_iter()
    .filter(|(_, old, new)| old != new)
    .map(|(field, old, new)| format!("{field} {old} → {new}"))
    .collect()
}

/// The pool a fleet entry describes, as the stored row would read.
fn pool_fields(pool: &PoolEntry) -> [(&'static str, String); 7] {
    [
        ("provider", pool.provider.clone()),
        ("image", pool.image.clone()),
        (
            "instance_type",
            pool.instance_type.clone().unwrap_or_default(),
        ),
        ("min_idle", pool.min_idle.to_string()),
        ("max_size", pool.max_size.to_string()),
        (
            "max_lifetime_secs",
            pool.max_lifetime_secs
                .map(|s| s.to_string())
                .unwrap_or_default(),
        ),
        (
            "fallbacks",
            serde_json::to_string(&pool.fallbacks).unwrap_or_default(),
        ),
    ]
}

fn entry_of(row: &PoolRow) -> PoolEntry {
    PoolEntry {
        provider: row.provider_name.clone(),
        image: row.image.clone(),
        instance_type: Some(row.instance_type.clone()),
        min_idle: u32::try_from(row.min_idle).unwrap_or_default(),
        max_size: u32::try_from(row.max_size).unwrap_or_default(),
        max_lifetime_secs: row.max_lifetime_secs.and_then(|s| u64::try_from(s).ok()),
        fallbacks: fallbacks_of(&row.fallbacks),
    }
}

/// What turns `current` into `desired` (references read already); with `prune`, what
/// `desired` does not name is deleted. A pool that leaves its instance type out keeps the
/// one it has. Pure: no database, no environment.
pub fn plan(
    current_providers: &BTreeMap<String, StoredConfig>,
    current_pools: &BTreeMap<String, PoolEntry>,
    desired_providers: &BTreeMap<String, StoredConfig>,
    desired_pools: &BTreeMap<String, PoolEntry>,
    prune: bool,
) -> Result<Plan, FleetError> {
    let mut plan = Plan::default();
    for (name, want) in desired_providers {
        match current_providers.get(name) {
            None => plan.create_providers.push((name.clone(), want.clone())),
            Some(have) if have.kind != want.kind => {
                return Err(FleetError {
                    line: None,
                    field: format!("providers.{name}.type"),
                    message: format!(
                        "provider {name} is {}; a type cannot change (delete the provider and make it anew)",
                        have.kind
                    ),
                })
            }
            Some(have) => {
                // Where a secret came from is not a change of the config: an export, whose
                // references may name variables the config was never read from, applies
                // as no change when the values are the same.
                let mut changed = Vec::new();
                differences(&have.config, &want.config, "", &mut changed);
                changed.extend(policy_changes(&have.policy, &want.policy));
                if !changed.is_empty() {
                    plan.update_providers.push((name.clone(), want.clone(), changed));
                }
            }
        }
    }
    for (name, want) in desired_pools {
        match current_pools.get(name) {
            None => plan.create_pools.push((name.clone(), want.clone())),
            Some(have) => {
                let mut want_full = want.clone();
                if want_full.instance_type.is_none() {
                    want_full.instance_type = have.instance_type.clone();
                }
                let changed: Vec<String> = pool_fields(have)
                    .into_iter()
                    .zip(pool_fields(&want_full))
                    .filter(|((_, old), (_, new))| old != new)
                    .map(|((field, old), (_, new))| {
                        let shown = |v: &str| {
                            if v.is_empty() {
                                "(default)".to_owned()
                            } else {
                                v.to_owned()
                            }
                        };
                        format!("{field} {} → {}", shown(&old), shown(&new))
                    })
                    .collect();
                if !changed.is_empty() {
                    plan.update_pools.push((name.clone(), want_full, changed));
                }
            }
        }
    }
    if prune {
        plan.delete_pools = current_pools
            .keys()
            .filter(|name| !desired_pools.contains_key(*name))
            .cloned()
            .collect();
        plan.delete_providers = current_providers
            .keys()
            .filter(|name| !desired_providers.contains_key(*name))
            .cloned()
            .collect();
    }
    Ok(plan)
}

/// The stored fleet: provider configs (opened, with their references) and pools.
async fn current(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
) -> Result<(BTreeMap<String, StoredConfig>, BTreeMap<String, PoolEntry>), BrokerError> {
    let mut providers = BTreeMap::new();
    for (stored, refs, policy) in stored::load_with_refs(conn, key).await? {
        let refs = refs
            .and_then(|r| serde_json::from_value(r).ok())
            .unwrap_or_default();
        providers.insert(
            stored.name,
            StoredConfig {
                kind: stored.kind,
                config: stored.config,
                refs,
                policy,
            },
        );
    }
    let pools = pools::list(conn)
        .await?
        .into_iter()
        .map(|status| (status.pool.name.clone(), entry_of(&status.pool)))
        .collect();
    Ok((providers, pools))
}

/// Why a fleet could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The document is wrong; the error says where.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The broker refused a part of it.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl From<diesel::result::Error> for ApplyError {
    fn from(error: diesel::result::Error) -> Self {
        ApplyError::Broker(error.into())
    }
}

impl From<InsertProviderError> for ApplyError {
    fn from(error: InsertProviderError) -> Self {
        match error {
            InsertProviderError::Database(error) => ApplyError::Broker(error.into()),
            other => ApplyError::Broker(BrokerError::Internal(anyhow::anyhow!("{other}"))),
        }
    }
}

/// How a document is applied.
#[derive(Debug, Clone, Copy, Default)]
pub struct How {
    /// Also delete what the document does not name.
    pub prune: bool,
    /// Only plan; change nothing.
    pub dry_run: bool,
}

/// Reads the fleet document `text` and applies it as [`apply`] does; an error names the
/// field and, where it can, the line.
pub async fn apply_document(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    max_lifetime: Option<std::time::Duration>,
    text: &str,
    secrets: &dyn Secrets,
    how: How,
) -> Result<Plan, ApplyError> {
    let fleet = Fleet::parse(text)?;
    let applied = apply(
        conn,
        key,
        max_lifetime,
        &fleet,
        secrets,
        how.prune,
        how.dry_run,
    )
    .await;
    applied.map_err(|error| match error {
        ApplyError::Fleet(mut e) => {
            e.line = e.line.or_else(|| locate(text, &e.field));
            ApplyError::Fleet(e)
        }
        other => other,
    })
}

/// The references of a fleet file, read from this process's environment (or `env`, which
/// comes first) and from files relative to the fleet file's directory: what the CLI and
/// `cloudbrain dev` use.
pub struct LocalSecrets {
    /// The fleet file's directory.
    pub dir: std::path::PathBuf,
    /// Values that stand in for environment variables.
    pub env: BTreeMap<String, String>,
}

impl Secrets for LocalSecrets {
    fn read(&self, _: &str, _: &str, reference: &Reference) -> Result<String, String> {
        match reference {
            Reference::Env(name) => self
                .env
                .get(name)
                .cloned()
                .or_else(|| std::env::var(name).ok())
                .ok_or_else(|| format!("environment variable {name} is not set")),
            Reference::File(path) => {
                let path = self.dir.join(path);
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("reading {}: {e}", path.display()))
            }
        }
    }
}

/// Makes the plan for `fleet`, reading its references through `secrets`, and, unless
/// `dry_run`, applies it in one transaction: all of it or none.
pub async fn apply(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    max_lifetime: Option<std::time::Duration>,
    fleet: &Fleet,
    secrets: &dyn Secrets,
    prune: bool,
    dry_run: bool,
) -> Result<Plan, ApplyError> {
    let mut desired = BTreeMap::new();
    for (name, entry) in &fleet.providers {
        let field = format!("providers.{name}.config");
        let mut refs = BTreeMap::new();
        let config =
            resolve(name, &entry.config, secrets, "", &mut refs).map_err(|e| FleetError {
                field: format!("{field}.{}", e.field),
                ..e
            })?;
        let factory = catalog::find(&entry.kind).map_err(|e| FleetError {
            line: None,
            field: format!("providers.{name}.type"),
            message: e.message,
        })?;
        factory.check(&config).map_err(|e| FleetError {
            line: None,
            field: format!("{field}.{}", e.field),
            message: e.message,
        })?;
        desired.insert(
            name.clone(),
            StoredConfig {
                kind: entry.kind.clone(),
                config,
                refs,
                policy: ProviderPolicy {
                    max_lifetime_secs: entry.max_lifetime_secs,
                    fallbacks: entry.fallbacks.clone(),
                },
            },
        );
    }
    let (have_providers, have_pools) = current(conn, key).await?;
    let plan = plan(&have_providers, &have_pools, &desired, &fleet.pools, prune)?;
    if dry_run || plan.is_empty() {
        return Ok(plan);
    }
    conn.transaction::<_, ApplyError, _>(async |conn| {
        for (name, c) in &plan.create_providers {
            stored::insert_provider(conn, key, name, &c.kind, &c.config)
                .await
                .map_err(|e| named(name, e))?;
            write_refs(conn, name, &c.refs).await?;
        }
        for (name, c, _) in &plan.update_providers {
            if have_providers.get(name).map(|h| &h.config) != Some(&c.config) {
                stored::update_provider(conn, key, name, &c.config)
                    .await
                    .map_err(|e| named(name, e))?;
            }
            write_refs(conn, name, &c.refs).await?;
        }
        // Once every provider exists, since a fallback may name one made just now.
        let policies = (plan.create_providers.iter().map(|(name, c)| (name, c)))
            .chain(plan.update_providers.iter().map(|(name, c, _)| (name, c)));
        for (name, c) in policies {
            stored::set_policy(conn, key, max_lifetime, name, &c.policy)
                .await
                .map_err(|e| field_error("providers", name, e))?;
        }
        let pool_writes = (plan.create_pools.iter().map(|(name, pool)| (name, pool)))
            .chain(plan.update_pools.iter().map(|(name, pool, _)| (name, pool)));
        for (name, pool) in pool_writes {
            let spec = PoolSpec {
                provider: pool.provider.clone(),
                image: pool.image.clone(),
                instance_type: pool.instance_type.clone(),
                min_idle: pool.min_idle,
                max_size: pool.max_size,
                max_lifetime_secs: pool.max_lifetime_secs,
                fallbacks: pool.fallbacks.clone(),
            };
            pools::put(conn, key, max_lifetime, name, &spec)
                .await
                .map_err(|e| field_error("pools", name, e))?;
        }
        for name in &plan.delete_pools {
            pools::delete(conn, name).await?;
        }
        for name in &plan.delete_providers {
            stored::delete_provider(conn, name)
                .await
                .map_err(|e| named(name, e))?;
        }
        Ok(())
    })
    .await?;
    Ok(plan)
}

async fn write_refs(
    conn: &mut AsyncPgConnection,
    name: &str,
    refs: &BTreeMap<String, Reference>,
) -> Result<(), ApplyError> {
    let refs = (!refs.is_empty()).then(|| serde_json::to_value(refs).unwrap_or_default());
    stored::set_secret_refs(conn, name, refs.as_ref())
        .await
        .map_err(|e| ApplyError::Broker(e.into()))
}

fn named(name: &str, error: InsertProviderError) -> ApplyError {
    match error {
        InsertProviderError::Config(e) => ApplyError::Fleet(FleetError {
            line: None,
            field: format!("providers.{name}.config.{}", e.field),
            message: e.message,
        }),
        InsertProviderError::InUse { .. }
        | InsertProviderError::NameTaken(_)
        | InsertProviderError::NoSuchProvider(_) => ApplyError::Fleet(FleetError {
            line: None,
            field: format!("providers.{name}"),
            message: error.to_string(),
        }),
        other => other.into(),
    }
}

/// A refusal of a field of `section.name` (`pools.ci.max_size`), where the document has it.
fn field_error(section: &str, name: &str, error: BrokerError) -> ApplyError {
    match error {
        BrokerError::Invalid { field, message } => ApplyError::Fleet(FleetError {
            line: None,
            field: format!("{section}.{name}.{field}"),
            message,
        }),
        other => ApplyError::Broker(other),
    }
}

/// The stored fleet as a document: every secret field as its reference (or, for a secret
/// given without one, a reference to an environment variable to set), so an export never
/// holds a secret and applying it, with those set, changes nothing.
pub async fn export(conn: &mut AsyncPgConnection, key: &SecretKey) -> Result<Fleet, BrokerError> {
    let (providers, pools) = current(conn, key).await?;
    let mut fleet = Fleet {
        pools,
        ..Fleet::default()
    };
    for (name, c) in providers {
        let mut config = c.config;
        let secret_fields = catalog::find(&c.kind)
            .map(|f| f.secret_fields())
            .unwrap_or_default();
        let mut paths: Vec<String> = c.refs.keys().cloned().collect();
        paths.extend(secret_fields.iter().map(|p| (*p).to_owned()));
        for path in paths {
            let reference = c.refs.get(&path).cloned().unwrap_or_else(|| {
                let var = format!("CLOUDBRAIN_{name}_{path}")
                    .to_ascii_uppercase()
                    .replace(|ch: char| !ch.is_ascii_alphanumeric(), "_");
                Reference::Env(var)
            });
            replace_at(
                &mut config,
                &path,
                serde_json::to_value(&reference).unwrap_or_default(),
            );
        }
        fleet.providers.insert(
            name,
            ProviderEntry {
                kind: c.kind,
                config,
                max_lifetime_secs: c.policy.max_lifetime_secs,
                fallbacks: c.policy.fallbacks,
            },
        );
    }
    Ok(fleet)
}

impl super::Broker {
    /// The stored fleet, secrets as references (admin only).
    pub async fn fleet(&self, caller: crate::auth::Caller) -> Result<Fleet, BrokerError> {
        super::admin_only(caller, "read the fleet")?;
        let mut conn = self.conn().await?;
        export(&mut conn, &self.key).await
    }

    /// Applies the fleet document `text` (admin only, asked before the document is
    /// read); its references read only as the values already stored for them (see
    /// [`StoredSecrets`]). An error names the field and, where it can, the line.
    pub async fn put_fleet(
        &self,
        caller: crate::auth::Caller,
        text: &str,
        prune: bool,
        dry_run: bool,
    ) -> Result<Plan, ApplyError> {
        super::admin_only(caller, "change the fleet")?;
        let mut conn = self.conn().await?;
        let secrets = StoredSecrets::load(&mut conn, &self.key).await?;
        let max_lifetime = self.max_lifetime;
        let how = How { prune, dry_run };
        let plan = apply_document(&mut conn, &self.key, max_lifetime, text, &secrets, how).await?;
        if !dry_run {
            // A pruned pool's drained machines: their events and remove jobs.
            self.announce(true);
        }
        Ok(plan)
    }
}

/// Puts `value` at dotted `path` in `doc`, if something is there.
fn replace_at(doc: &mut Value, path: &str, value: Value) {
    let mut at = doc;
    let mut keys = path.split('.').peekable();
    while let Some(key) = keys.next() {
        let Some(next) = at.get_mut(key) else { return };
        if keys.peek().is_none() {
            if !next.is_null() {
                *next = value;
            }
            return;
        }
        at = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_document_is_refused_naming_the_line_and_the_field() {
        let text = "providers:\n  fake:\n    type: fake\npools:\n  ci:\n    provider: fake\n    image: ubuntu\n    max_size: ten\n";
        let err = Fleet::parse(text).unwrap_err();
        assert_eq!(err.line, Some(8), "{err}");
        assert_eq!(err.field, "pools.ci.max_size");
        let err = Fleet::parse(
            "pools:\n  ci:\n    provider: fake\n    image: x\n    max_size: 2\n    colour: red\n",
        )
        .unwrap_err();
        assert_eq!(err.line, Some(6), "{err}");
        assert!(err.message.contains("colour"), "{err}");
        assert_eq!(
            locate("pools:\n  ci:\n    min_idle: 2\n", "pools.ci.min_idle"),
            Some(3)
        );
        assert_eq!(locate("a:\n  b: 1\nc:\n  b: 2\n", "c.b"), Some(4));
    }

    fn config(doc: Value) -> StoredConfig {
        StoredConfig {
            kind: "fake".into(),
            config: doc,
            refs: BTreeMap::new(),
            policy: ProviderPolicy::default(),
        }
    }

    fn pool(min_idle: u32) -> PoolEntry {
        PoolEntry {
            provider: "fake".into(),
            image: "ubuntu".into(),
            instance_type: None,
            min_idle,
            max_size: 5,
            max_lifetime_secs: None,
            fallbacks: Vec::new(),
        }
    }

    #[test]
    fn a_plan_names_every_change_field_by_field_and_prunes_only_when_asked() {
        let one = |name: &str, c: StoredConfig| BTreeMap::from([(name.to_owned(), c)]);
        let have = one("fake", config(serde_json::json!({"boot_time_ms": 1})));
        let mut stored_pool = pool(1);
        stored_pool.instance_type = Some("standard".into());
        let have_pools = BTreeMap::from([
            ("ci".to_owned(), stored_pool.clone()),
            ("old".to_owned(), pool(0)),
        ]);
        let want = one("fake", config(serde_json::json!({"boot_time_ms": 2})));
        let want_pools = BTreeMap::from([("ci".to_owned(), pool(3))]);
        let plan = plan(&have, &have_pools, &want, &want_pools, false).unwrap();
        assert_eq!(
            plan.lines(),
            [
                "update provider fake: boot_time_ms",
                "update pool ci: min_idle 1 → 3"
            ]
        );
        let pruned = super::plan(&have, &have_pools, &want, &want_pools, true).unwrap();
        assert_eq!(pruned.delete_pools, ["old"]);
        // The same state again is no change at all.
        let same = super::plan(&have, &have_pools, &have, &have_pools, true).unwrap();
        assert!(same.is_empty(), "{:?}", same.lines());
        let mut other_kind = config(serde_json::json!({}));
        other_kind.kind = "ec2".into();
        let err = super::plan(
            &have,
            &have_pools,
            &one("fake", other_kind),
            &want_pools,
            false,
        )
        .unwrap_err();
        assert_eq!(err.field, "providers.fake.type");
    }

    struct Env;

    impl Secrets for Env {
        fn read(&self, _: &str, _: &str, reference: &Reference) -> Result<String, String> {
            match reference {
                Reference::Env(name) if name == "SET" => Ok("hunter2\n".into()),
                Reference::File(_) => Ok("{\"private_key\": \"k\"}".into()),
                other => Err(format!("{other:?} is not set")),
            }
        }
    }

    #[test]
    fn references_are_read_and_remembered_by_path() {
        let mut refs = BTreeMap::new();
        let doc = serde_json::json!({"a": {"$env": "SET"}, "b": {"c": {"$file": "key.json"}}, "d": 1, "tags": {"env": "prod"}});
        let resolved = resolve("p", &doc, &Env, "", &mut refs).unwrap();
        assert_eq!(
            resolved,
            serde_json::json!({"a": "hunter2", "b": {"c": {"private_key": "k"}}, "d": 1, "tags": {"env": "prod"}})
        );
        assert_eq!(refs["a"], Reference::Env("SET".into()));
        assert_eq!(refs["b.c"], Reference::File("key.json".into()));
        let err = resolve(
            "p",
            &serde_json::json!({"x": {"$env": "UNSET"}}),
            &Env,
            "",
            &mut refs,
        )
        .unwrap_err();
        assert_eq!(err.field, "x");
    }
}
