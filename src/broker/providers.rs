//! Stored provider configs: register one (sealed, with what it offers in the clear), list
//! them, read what one offers without opening the seal, and open them for the workers.

use std::collections::HashMap;
use std::sync::Arc;

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};

use super::model::{NewProvider, PoolRow, ProviderRow};
use super::{Broker, BrokerError};
use crate::crypto::SecretKey;
use crate::db::schema::{pools, providers};
use crate::db::CacheStatement;
use crate::providers::{catalog, StoredProvider};
use cloudbrain_provider::Offer;

/// A provider as clients may see it: never its configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ProviderSummary {
    /// The name clients put in `provider`.
    pub name: String,
    /// `fake`, `ec2` or `gce`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The longest an instance on it lives, in seconds; null: the broker's longest.
    pub max_lifetime_secs: Option<u64>,
    /// The offerings its instances fall back to when it has no room.
    pub fallbacks: Vec<super::offerings::Fallback>,
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
    /// No provider has this name.
    #[error("there is no provider named {0:?}")]
    NoSuchProvider(String),
    /// Something live still uses the provider; the message says what.
    #[error("provider {name:?} is in use: {what}")]
    InUse {
        /// The provider's name.
        name: String,
        /// What uses it.
        what: String,
    },
    /// The database refused.
    #[error(transparent)]
    Database(#[from] diesel::result::Error),
}

/// Checks `config` for `kind`, seals it with `key` and stores it under `name`.
pub async fn insert_provider(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    name: &str,
    kind: &str,
    config: &serde_json::Value,
) -> Result<Offer, InsertProviderError> {
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
    let offer = catalog::find(kind)?.check(config)?;
    let sealed = key.seal(config.to_string().as_bytes());
    let inserted = diesel::insert_into(providers::table)
        .values(NewProvider {
            name,
            kind,
            config: &sealed,
            offer: &offer_json(&offer),
        })
        .on_conflict(providers::name)
        .do_nothing()
        .execute(conn)
        .await?;
    if inserted == 0 {
        return Err(InsertProviderError::NameTaken(name.to_owned()));
    }
    Ok(offer)
}

/// Replaces the config of provider `name` (its kind stays) after checking it; every worker
/// rebuilds its live provider from it within one cycle.
pub async fn update_provider(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    name: &str,
    config: &serde_json::Value,
) -> Result<Offer, InsertProviderError> {
    let kind: String = providers::table
        .filter(providers::name.eq(name))
        .select(providers::type_)
        .first(conn)
        .await
        .optional()?
        .ok_or_else(|| InsertProviderError::NoSuchProvider(name.to_owned()))?;
    let offer = catalog::find(&kind)?.check(config)?;
    let sealed = key.seal(config.to_string().as_bytes());
    diesel::update(providers::table.filter(providers::name.eq(name)))
        .set((
            providers::config.eq(&sealed),
            providers::offer.eq(offer_json(&offer)),
            providers::updated_at.eq(diesel::dsl::now),
            // A config given whole names no references; a fleet apply sets them after.
            providers::secret_refs.eq(None::<serde_json::Value>),
        ))
        .execute(conn)
        .await?;
    Ok(offer)
}

/// Records where provider `name`'s secrets came from (see `broker::fleet`).
pub async fn set_secret_refs(
    conn: &mut AsyncPgConnection,
    name: &str,
    refs: Option<&serde_json::Value>,
) -> QueryResult<()> {
    diesel::update(providers::table.filter(providers::name.eq(name)))
        .set(providers::secret_refs.eq(refs))
        .execute(conn)
        .await?;
    Ok(())
}

/// Every stored provider config, opened, with the references of its secrets.
pub async fn load_with_refs(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
) -> Result<Vec<(StoredProvider, Option<serde_json::Value>, ProviderPolicy)>, BrokerError> {
    let rows: Vec<ProviderRow> = providers::table
        .select(ProviderRow::as_select())
        .order(providers::name)
        .load(conn)
        .await?;
    rows.into_iter()
        .map(|row| {
            let refs = row.secret_refs.clone();
            let policy = ProviderPolicy::of(row.max_lifetime_secs, &row.fallbacks);
            open(key, row).map(|stored| (stored, refs, policy))
        })
        .collect()
}

/// Deletes provider `name`, refused while a pool names it or an instance on it is not yet
/// terminated (its machine would have no one left to destroy it).
pub async fn delete_provider(
    conn: &mut AsyncPgConnection,
    name: &str,
) -> Result<(), InsertProviderError> {
    use crate::db::schema::{instances, pools};
    conn.transaction::<_, InsertProviderError, _>(async |conn| {
        let found: Option<String> = providers::table
            .filter(providers::name.eq(name))
            .select(providers::name)
            .for_update()
            .first(conn)
            .await
            .optional()?;
        if found.is_none() {
            return Err(InsertProviderError::NoSuchProvider(name.to_owned()));
        }
        let pools: Vec<String> = pools::table
            .filter(pools::provider_name.eq(name))
            .select(pools::name)
            .order(pools::name)
            .load(conn)
            .await?;
        if !pools.is_empty() {
            return Err(InsertProviderError::InUse {
                name: name.to_owned(),
                what: format!("pools {}", pools.join(", ")),
            });
        }
        let live: i64 = instances::table
            .filter(instances::provider_name.eq(name))
            .filter(instances::state.ne(super::State::Terminated))
            .count()
            .get_result(conn)
            .await?;
        if live > 0 {
            return Err(InsertProviderError::InUse {
                name: name.to_owned(),
                what: format!("{live} instance(s) not yet terminated"),
            });
        }
        diesel::delete(providers::table.filter(providers::name.eq(name)))
            .execute(conn)
            .await?;
        Ok(())
    })
    .await
}

/// What a provider config says beyond its cloud's config, for every instance on it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderPolicy {
    /// The longest an instance on it lives, in seconds (`None`: the broker's longest).
    pub max_lifetime_secs: Option<u64>,
    /// The offerings its instances fall back to, in order, when it has no room.
    pub fallbacks: Vec<super::offerings::Fallback>,
}

impl ProviderPolicy {
    fn of(row_lifetime: Option<i64>, row_fallbacks: &serde_json::Value) -> Self {
        Self {
            max_lifetime_secs: row_lifetime.and_then(|s| u64::try_from(s).ok()),
            fallbacks: super::offerings::fallbacks_of(row_fallbacks),
        }
    }
}

/// The policy of provider `name`; `None` if there is no such provider.
pub async fn policy_of(
    conn: &mut AsyncPgConnection,
    name: &str,
) -> Result<Option<ProviderPolicy>, BrokerError> {
    let row: Option<(Option<i64>, serde_json::Value)> = providers::table
        .filter(providers::name.eq(name))
        .select((providers::max_lifetime_secs, providers::fallbacks))
        .first(conn)
        .await
        .optional()?;
    Ok(row.map(|(lifetime, fallbacks)| ProviderPolicy::of(lifetime, &fallbacks)))
}

/// Sets provider `name`'s policy, checked against the broker's longest lifetime
/// `max_lifetime` and the providers and types its fallbacks name.
pub async fn set_policy(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    max_lifetime: Option<std::time::Duration>,
    name: &str,
    policy: &ProviderPolicy,
) -> Result<(), BrokerError> {
    if let Some(secs) = policy.max_lifetime_secs {
        super::validate::Lifetime::check_bound("max_lifetime_secs", secs, max_lifetime)?;
    }
    super::offerings::check_fallbacks(conn, key, name, &policy.fallbacks).await?;
    let fallbacks = serde_json::to_value(&policy.fallbacks)
        .map_err(|e| BrokerError::Internal(anyhow::anyhow!("fallbacks: {e}")))?;
    let lifetime = policy.max_lifetime_secs.and_then(|s| i64::try_from(s).ok());
    diesel::update(providers::table.filter(providers::name.eq(name)))
        .set((
            providers::max_lifetime_secs.eq(lifetime),
            providers::fallbacks.eq(fallbacks),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

fn offer_json(offer: &Offer) -> serde_json::Value {
    serde_json::to_value(offer).unwrap_or_default()
}

/// Every registered provider, by name.
pub async fn list_providers(conn: &mut AsyncPgConnection) -> QueryResult<Vec<ProviderSummary>> {
    let rows: Vec<(String, String, Option<i64>, serde_json::Value)> = providers::table
        .select((
            providers::name,
            providers::type_,
            providers::max_lifetime_secs,
            providers::fallbacks,
        ))
        .order(providers::name)
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(name, kind, lifetime, fallbacks)| {
            let policy = ProviderPolicy::of(lifetime, &fallbacks);
            ProviderSummary {
                name,
                kind,
                max_lifetime_secs: policy.max_lifetime_secs,
                fallbacks: policy.fallbacks,
            }
        })
        .collect())
}

/// Opens a stored row's sealed config.
fn open(key: &SecretKey, row: ProviderRow) -> Result<StoredProvider, BrokerError> {
    let name = row.name;
    let plain = key
        .open(&row.config)
        .map_err(|e| anyhow::anyhow!("provider {name}: {e}"))?;
    let config = serde_json::from_slice(&plain)
        .map_err(|e| anyhow::anyhow!("provider {name}: stored config is not JSON: {e}"))?;
    Ok(StoredProvider {
        name,
        kind: row.kind,
        config,
        version: row.updated_at,
    })
}

/// What a stored row offers: read from its `offer` column, or, for a row registered before
/// that column, worked out from its sealed config once and written back.
async fn offer_of(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    row: ProviderRow,
) -> Result<Offer, BrokerError> {
    if let Some(offer) = row.offer.as_ref().and_then(|o| Offer::deserialize(o).ok()) {
        return Ok(offer);
    }
    let id = row.id;
    let stored = open(key, row)?;
    let name = &stored.name;
    let offer = catalog::find(&stored.kind)
        .and_then(|kind| kind.check(&stored.config))
        .map_err(|e| anyhow::anyhow!("provider {name}: {e}"))?;
    diesel::update(providers::table.find(id))
        .set(providers::offer.eq(offer_json(&offer)))
        .execute(conn)
        .await?;
    Ok(offer)
}

/// The instance type a request for `instance_type` (absent, empty or `default`: the
/// provider's default) on provider `provider` gets; refused, naming the field, when there
/// is no such provider or it does not offer that type.
pub async fn offered_type(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    provider: &super::validate::ProviderName,
    instance_type: Option<&str>,
) -> Result<(String, ProviderPolicy), BrokerError> {
    let (offered, policy) = find_provider(conn, key, provider)
        .await?
        .ok_or_else(|| no_such_provider(provider))?;
    Ok((resolve_type(provider, &offered, instance_type)?, policy))
}

/// What a request that names no pool goes by: the offer and policy of its provider and
/// the pools that make its image there (by name), as of one `version` of the catalog
/// (the `catalog_version` row, which every change to `providers` or `pools` moves).
#[derive(Debug, Clone)]
pub struct Offered {
    offer: Offer,
    policy: ProviderPolicy,
    pools: Vec<PoolRow>,
    version: i64,
}

impl Offered {
    /// The type a request for `instance_type` on `provider` gets ([`offered_type`]), and
    /// the pool that makes that type, if any.
    pub fn shape(
        &self,
        provider: &super::validate::ProviderName,
        instance_type: Option<&str>,
    ) -> Result<(String, Option<&PoolRow>), BrokerError> {
        let instance_type = resolve_type(provider, &self.offer, instance_type)?;
        let pool = self.pools.iter().find(|p| p.instance_type == instance_type);
        Ok((instance_type, pool))
    }

    /// The provider's policy.
    pub fn policy(&self) -> &ProviderPolicy {
        &self.policy
    }

    /// The catalog version this was read at.
    pub fn version(&self) -> i64 {
        self.version
    }
}

/// [`Offered`] for `provider` and `image`, in one statement; refused, naming the field,
/// when there is no such provider.
pub async fn offered(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    provider: &super::validate::ProviderName,
    image: &super::validate::ImageName,
) -> Result<Offered, BrokerError> {
    let rows: Vec<(ProviderRow, Option<PoolRow>, i64)> = providers::table
        .left_join(
            pools::table.on(pools::provider_name
                .eq(providers::name)
                .and(pools::image.eq(image.as_str()))),
        )
        .filter(providers::name.eq(provider.as_str()))
        .order(pools::name)
        .select((
            ProviderRow::as_select(),
            Option::<PoolRow>::as_select(),
            diesel::dsl::sql::<diesel::sql_types::Int8>("(SELECT version FROM catalog_version)"),
        ))
        // Its one literal would keep diesel from preparing it once per connection.
        .cached()
        .load(conn)
        .await?;
    let mut rows = rows.into_iter();
    let (row, first, version) = rows.next().ok_or_else(|| no_such_provider(provider))?;
    let policy = ProviderPolicy::of(row.max_lifetime_secs, &row.fallbacks);
    let offer = offer_of(conn, key, row).await?;
    let pools = first
        .into_iter()
        .chain(rows.filter_map(|(_, pool, _)| pool))
        .collect();
    Ok(Offered {
        offer,
        policy,
        pools,
        version,
    })
}

/// What one process remembers of [`offered`], by provider and image: what lets a request
/// that names no pool be written in one statement, the insert checking that the catalog
/// has not moved since (`broker::instances::insert_new`). Only what exists is remembered;
/// at most [`OfferCache::MAX_ENTRIES`] of it.
#[derive(Debug, Default)]
pub struct OfferCache(std::sync::Mutex<HashMap<String, HashMap<String, Arc<Offered>>>>);

impl OfferCache {
    /// Entries held; one more forgets them all.
    pub const MAX_ENTRIES: usize = 1024;

    /// What is remembered for `provider` and `image`.
    pub fn get(&self, provider: &str, image: &str) -> Option<Arc<Offered>> {
        let entries = self.0.lock().ok()?;
        entries.get(provider)?.get(image).cloned()
    }

    /// Remembers `offered` for `provider` and `image`, forgetting what was read at an
    /// older version of the catalog.
    pub fn keep(&self, provider: &str, image: &str, offered: Offered) {
        let Ok(mut entries) = self.0.lock() else {
            return;
        };
        let version = offered.version;
        if entries.values().map(HashMap::len).sum::<usize>() >= Self::MAX_ENTRIES {
            entries.clear();
        }
        for images in entries.values_mut() {
            images.retain(|_, kept| kept.version >= version);
        }
        (entries.entry(provider.to_owned()).or_default())
            .insert(image.to_owned(), Arc::new(offered));
    }

    /// Forgets everything: the catalog moved.
    pub fn clear(&self) {
        if let Ok(mut entries) = self.0.lock() {
            entries.clear();
        }
    }
}

fn no_such_provider(provider: &super::validate::ProviderName) -> BrokerError {
    BrokerError::invalid(
        "provider",
        format!("provider {:?} does not exist", provider.as_str()),
    )
}

/// The type a request for `instance_type` gets from what `provider` offers.
fn resolve_type(
    provider: &super::validate::ProviderName,
    offered: &Offer,
    instance_type: Option<&str>,
) -> Result<String, BrokerError> {
    let instance_type = match instance_type {
        None | Some("") | Some(cloudbrain_provider::DEFAULT_TYPE_ALIAS) => {
            offered.default_instance_type.clone()
        }
        Some(named) => super::validate::InstanceTypeName::parse(named)?
            .as_str()
            .to_owned(),
    };
    if !offered.instance_types.contains(&instance_type) {
        return Err(BrokerError::invalid(
            "instance_type",
            format!(
                "provider {:?} does not offer instance_type {:?}; it offers {}",
                provider.as_str(),
                instance_type,
                offered.instance_types.join(", ")
            ),
        ));
    }
    Ok(instance_type)
}

/// What the provider named `name` offers; `None` if there is none.
pub async fn find_offer(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    name: &super::validate::ProviderName,
) -> Result<Option<Offer>, BrokerError> {
    Ok(find_provider(conn, key, name)
        .await?
        .map(|(offer, _)| offer))
}

/// What the provider named `name` offers and its policy, in one read; `None` if there is
/// no such provider.
async fn find_provider(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    name: &super::validate::ProviderName,
) -> Result<Option<(Offer, ProviderPolicy)>, BrokerError> {
    let Some(row) = providers::table
        .filter(providers::name.eq(name.as_str()))
        .select(ProviderRow::as_select())
        .first(conn)
        .await
        .optional()?
    else {
        return Ok(None);
    };
    let policy = ProviderPolicy::of(row.max_lifetime_secs, &row.fallbacks);
    Ok(Some((offer_of(conn, key, row).await?, policy)))
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

    /// Every provider config's policy, by name.
    pub async fn provider_policies(
        &self,
    ) -> Result<std::collections::BTreeMap<String, ProviderPolicy>, BrokerError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, Option<i64>, serde_json::Value)> = providers::table
            .select((
                providers::name,
                providers::max_lifetime_secs,
                providers::fallbacks,
            ))
            .load(&mut conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(name, lifetime, fallbacks)| (name, ProviderPolicy::of(lifetime, &fallbacks)))
            .collect())
    }

    /// Every usable provider config's name and the instance type names it offers.
    pub async fn offered_instance_types(&self) -> Result<Vec<(String, Vec<String>)>, BrokerError> {
        let mut conn = self.conn().await?;
        let rows: Vec<ProviderRow> = providers::table
            .select(ProviderRow::as_select())
            .order(providers::name)
            .load(&mut conn)
            .await?;
        let mut offered = Vec::new();
        for row in rows {
            let name = row.name.clone();
            match offer_of(&mut conn, &self.key, row).await {
                Ok(offer) => offered.push((name, offer.instance_types)),
                Err(error) => tracing::error!(%error, "skipping provider {name}"),
            }
        }
        Ok(offered)
    }

    /// Every registered provider's name and type.
    pub async fn list_providers(&self) -> Result<Vec<ProviderSummary>, BrokerError> {
        let mut conn = self.conn().await?;
        Ok(list_providers(&mut conn).await?)
    }
}
