//! Provider configs: register one (sealed), list them, and read what one offers.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use super::{Broker, BrokerError};
use crate::crypto::SecretKey;
use crate::db::models::{NewProvider, ProviderRow};
use crate::db::schema::providers;
use crate::providers::{settings, ProviderKind, ProviderSettings, StoredProvider};

/// A provider as clients may see it: never its configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ProviderSummary {
    /// The name clients put in `provider`.
    pub name: String,
    /// `fake`, `ec2` or `gce`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// Why a provider config could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum InsertProviderError {
    /// The config was refused; the message names the field.
    #[error(transparent)]
    Config(#[from] cloudbrain_provider::ConfigError),
    /// The name is taken.
    #[error("a provider named {0:?} already exists")]
    NameTaken(String),
    /// The database refused.
    #[error(transparent)]
    Database(#[from] diesel::result::Error),
}

/// Checks `config` for `kind`, seals it with `key` and stores it under `name`.
pub async fn insert_provider(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    name: &str,
    kind: ProviderKind,
    config: &serde_json::Value,
) -> Result<ProviderSettings, InsertProviderError> {
    if name.trim().is_empty()
        || name.len() > super::validate::MAX_PROVIDER_LEN
        || name.chars().any(super::validate::is_forbidden_char)
    {
        return Err(cloudbrain_provider::ConfigError::new(
            "name",
            "must be 1 to 255 characters without control characters",
        )
        .into());
    }
    let found = settings(kind, config)?;
    let sealed = key.seal(config.to_string().as_bytes());
    let inserted = diesel::insert_into(providers::table)
        .values(NewProvider {
            name,
            kind: kind.as_str(),
            config: &sealed,
        })
        .on_conflict(providers::name)
        .do_nothing()
        .execute(conn)
        .await?;
    if inserted == 0 {
        return Err(InsertProviderError::NameTaken(name.to_owned()));
    }
    Ok(found)
}

/// Every registered provider, by name.
pub async fn list_providers(conn: &mut AsyncPgConnection) -> QueryResult<Vec<ProviderSummary>> {
    let rows: Vec<(String, String)> = providers::table
        .select((providers::name, providers::type_))
        .order(providers::name)
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(name, kind)| ProviderSummary { name, kind })
        .collect())
}

/// Opens a stored row: its kind and its config document.
fn open(key: &SecretKey, row: ProviderRow) -> Result<StoredProvider, BrokerError> {
    let name = row.name;
    let kind = ProviderKind::parse(&row.kind)
        .ok_or_else(|| anyhow::anyhow!("provider {name} has unknown type {}", row.kind))?;
    let plain = key
        .open(&row.config)
        .map_err(|e| anyhow::anyhow!("provider {name}: {e}"))?;
    let config = serde_json::from_slice(&plain)
        .map_err(|e| anyhow::anyhow!("provider {name}: stored config is not JSON: {e}"))?;
    Ok(StoredProvider { name, kind, config })
}

/// Reads the provider named `name` and what its config offers; `None` if there is none.
pub async fn find_settings(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    name: &str,
) -> Result<Option<ProviderSettings>, BrokerError> {
    let Some(row) = providers::table
        .filter(providers::name.eq(name))
        .select(ProviderRow::as_select())
        .first(conn)
        .await
        .optional()?
    else {
        return Ok(None);
    };
    let stored = open(key, row)?;
    let found = settings(stored.kind, &stored.config)
        .map_err(|e| anyhow::anyhow!("provider {name}: {e}"))?;
    Ok(Some(found))
}

/// Every stored provider config, opened; a row that cannot be opened is logged and skipped.
pub async fn load_stored(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
) -> Result<Vec<StoredProvider>, BrokerError> {
    let rows: Vec<ProviderRow> = providers::table
        .select(ProviderRow::as_select())
        .order(providers::name)
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| match open(key, row) {
            Ok(stored) => Some(stored),
            Err(error) => {
                tracing::error!(%error, "skipping a provider config");
                None
            }
        })
        .collect())
}

impl Broker {
    /// Every stored provider config, opened, for the workers' registry.
    pub async fn stored_providers(&self) -> Result<Vec<StoredProvider>, BrokerError> {
        let mut conn = self.conn().await?;
        load_stored(&mut conn, &self.key).await
    }

    /// Every usable provider config's name and the instance type names it offers.
    pub async fn offered_instance_types(&self) -> Result<Vec<(String, Vec<String>)>, BrokerError> {
        let stored = self.stored_providers().await?;
        Ok(stored
            .into_iter()
            .filter_map(|p| {
                let offered = settings(p.kind, &p.config).ok()?;
                Some((p.name, offered.instance_types))
            })
            .collect())
    }

    /// Every registered provider's name and type.
    pub async fn list_providers(&self) -> Result<Vec<ProviderSummary>, BrokerError> {
        let mut conn = self.conn().await?;
        Ok(list_providers(&mut conn).await?)
    }
}
