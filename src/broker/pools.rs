//! Pools: named shapes of machine kept warm. Admins write a pool's shape and size; any
//! token reads them with the counts of their instances.

use std::collections::BTreeMap;

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::lifecycle::Decision;
use super::model::{Instance, NewPool, PoolRow};
use super::providers::offered_type;
use super::state::{apply, State};
use super::validate::{ImageName, Lifetime, PoolName, ProviderName};
use super::{Broker, BrokerError};
use crate::auth::{Caller, Scope};
use crate::db::schema::{instances, pools};

/// Most machines one pool may hold.
pub const MAX_POOL_SIZE: u32 = 10_000;
/// How many of a pool's latest instance errors it shows.
pub const LAST_ERRORS: usize = 5;

/// A pool's shape and size, as an admin asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// The provider config its machines run on.
    pub provider: String,
    /// The image they boot.
    pub image: String,
    /// The instance type; absent, empty or `default` is the provider's default type.
    pub instance_type: Option<String>,
    /// Machines kept booted and unassigned.
    pub min_idle: u32,
    /// Most live instances of the pool, idle, busy and booting.
    pub max_size: u32,
    /// The longest one of its machines lives; absent: the broker's longest.
    pub max_lifetime_secs: Option<u64>,
}

/// How a pool's live instances stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Running and unassigned: what a request can take at once.
    pub idle: u32,
    /// Assigned to a client and not yet given back.
    pub busy: u32,
    /// Unassigned and still booting.
    pub starting: u32,
    /// Errored, their machines being cleaned up.
    pub errored: u32,
    /// Being destroyed: given back, expired or scaled in.
    pub expiring: u32,
}

impl PoolCounts {
    /// The instances that count against `max_size`: every one not on its way out.
    pub fn live(&self) -> u32 {
        self.idle + self.busy + self.starting
    }

    fn count(&mut self, row: &Instance) {
        let assigned = row.owner_token_id.is_some();
        let slot = match (row.state, assigned) {
            (State::Running, false) => &mut self.idle,
            (State::Creating | State::Starting | State::Running, true) => &mut self.busy,
            (State::Creating | State::Starting, false) => &mut self.starting,
            (State::Errored, _) => &mut self.errored,
            (State::Terminating, _) => &mut self.expiring,
            (State::Terminated, _) => return,
        };
        *slot += 1;
    }
}

/// A pool with the counts of its instances and its latest errors.
#[derive(Debug, Clone)]
pub struct PoolStatus {
    /// Its shape and size.
    pub pool: PoolRow,
    /// How its instances stand.
    pub counts: PoolCounts,
    /// The reasons of its latest errored instances, newest first.
    pub last_errors: Vec<String>,
}

fn admin_only(caller: Caller) -> Result<(), BrokerError> {
    if caller.scope == Scope::Admin {
        Ok(())
    } else {
        Err(BrokerError::Forbidden(
            "only an admin token may change pools".to_owned(),
        ))
    }
}

fn no_pool(name: &PoolName) -> BrokerError {
    BrokerError::NoSuchPool(name.as_str().to_owned())
}

impl Broker {
    /// Makes pool `name` or changes its shape and size (admin only); the pool worker
    /// brings its instances to the new shape within one cycle.
    pub async fn put_pool(
        &self,
        caller: Caller,
        name: &str,
        spec: PoolSpec,
    ) -> Result<PoolStatus, BrokerError> {
        admin_only(caller)?;
        let name = PoolName::parse(name)?;
        let provider = ProviderName::parse(&spec.provider)?;
        let image = ImageName::parse(&spec.image)?;
        if !(1..=MAX_POOL_SIZE).contains(&spec.max_size) {
            return Err(BrokerError::invalid(
                "max_size",
                format!("max_size must be from 1 to {MAX_POOL_SIZE}"),
            ));
        }
        if spec.min_idle > spec.max_size {
            return Err(BrokerError::invalid(
                "min_idle",
                "min_idle must be at most max_size",
            ));
        }
        if let Some(secs) = spec.max_lifetime_secs {
            Lifetime::parse(Some(secs), self.max_lifetime).map_err(|_out_of_range| {
                BrokerError::invalid(
                    "max_lifetime_secs",
                    format!(
                        "max_lifetime_secs must be from 1 to {}",
                        Lifetime::most_seconds(self.max_lifetime)
                    ),
                )
            })?;
        }
        let mut conn = self.conn().await?;
        let instance_type = offered_type(
            &mut conn,
            &self.key,
            &provider,
            spec.instance_type.as_deref(),
        )
        .await?;
        let new = NewPool {
            name: name.as_str(),
            provider_name: provider.as_str(),
            image: image.as_str(),
            instance_type: &instance_type,
            min_idle: i32::try_from(spec.min_idle).unwrap_or(i32::MAX),
            max_size: i32::try_from(spec.max_size).unwrap_or(i32::MAX),
            max_lifetime_secs: spec.max_lifetime_secs.and_then(|s| i64::try_from(s).ok()),
        };
        diesel::insert_into(pools::table)
            .values(&new)
            .on_conflict(pools::name)
            .do_update()
            .set((&new, pools::updated_at.eq(diesel::dsl::now)))
            .execute(&mut conn)
            .await?;
        tracing::info!(pool = name.as_str(), "pool {} written", name.as_str());
        status(&mut conn, &name).await
    }

    /// Sets how many idle machines pool `name` keeps (admin only), as Barcelona's scale.
    pub async fn scale_pool(
        &self,
        caller: Caller,
        name: &str,
        min_idle: u32,
    ) -> Result<PoolStatus, BrokerError> {
        admin_only(caller)?;
        let name = PoolName::parse(name)?;
        let mut conn = self.conn().await?;
        let pool = find(&mut conn, &name).await?;
        if i64::from(min_idle) > i64::from(pool.max_size) {
            return Err(BrokerError::invalid(
                "min_idle",
                format!(
                    "min_idle must be at most the pool's max_size, {}",
                    pool.max_size
                ),
            ));
        }
        diesel::update(pools::table.find(name.as_str()))
            .set((
                pools::min_idle.eq(i32::try_from(min_idle).unwrap_or(i32::MAX)),
                pools::updated_at.eq(diesel::dsl::now),
            ))
            .execute(&mut conn)
            .await?;
        tracing::info!(
            pool = name.as_str(),
            min_idle,
            "pool {} scaled",
            name.as_str()
        );
        status(&mut conn, &name).await
    }

    /// Removes pool `name` (admin only): its idle and booting machines are destroyed,
    /// machines clients hold stay theirs until given back. The pool as it was is returned.
    pub async fn delete_pool(&self, caller: Caller, name: &str) -> Result<PoolStatus, BrokerError> {
        admin_only(caller)?;
        let name = PoolName::parse(name)?;
        let mut conn = self.conn().await?;
        let before = status(&mut conn, &name).await?;
        conn.transaction::<_, BrokerError, _>(async |conn| {
            let idle: Vec<Instance> = instances::table
                .filter(instances::pool_name.eq(name.as_str()))
                .filter(instances::owner_token_id.is_null())
                .filter(instances::state.eq_any([State::Creating, State::Starting, State::Running]))
                .select(Instance::as_select())
                .for_update()
                .load(conn)
                .await?;
            let drain = Decision::BeginTermination {
                reason: format!("pool {} deleted", name.as_str()),
            };
            for instance in idle {
                apply(conn, instance.id, &drain).await?;
            }
            diesel::delete(pools::table.find(name.as_str()))
                .execute(conn)
                .await?;
            Ok(())
        })
        .await?;
        tracing::info!(pool = name.as_str(), "pool {} deleted", name.as_str());
        Ok(before)
    }

    /// Every pool, by name, with its counts.
    pub async fn pools(&self) -> Result<Vec<PoolStatus>, BrokerError> {
        let mut conn = self.conn().await?;
        let rows: Vec<PoolRow> = pools::table
            .order(pools::name)
            .select(PoolRow::as_select())
            .load(&mut conn)
            .await?;
        let mut all = Vec::with_capacity(rows.len());
        for pool in rows {
            all.push(with_counts(&mut conn, pool).await?);
        }
        Ok(all)
    }

    /// Pool `name` with its counts.
    pub async fn pool(&self, name: &str) -> Result<PoolStatus, BrokerError> {
        let name = PoolName::parse(name)
            .map_err(|_not_a_name| BrokerError::NoSuchPool(name.to_owned()))?;
        let mut conn = self.conn().await?;
        status(&mut conn, &name).await
    }
}

async fn find(conn: &mut AsyncPgConnection, name: &PoolName) -> Result<PoolRow, BrokerError> {
    pools::table
        .find(name.as_str())
        .select(PoolRow::as_select())
        .first(conn)
        .await
        .optional()?
        .ok_or_else(|| no_pool(name))
}

async fn status(conn: &mut AsyncPgConnection, name: &PoolName) -> Result<PoolStatus, BrokerError> {
    let pool = find(conn, name).await?;
    with_counts(conn, pool).await
}

/// The counts and latest errors of `pool`'s instances.
pub(crate) async fn with_counts(
    conn: &mut AsyncPgConnection,
    pool: PoolRow,
) -> Result<PoolStatus, BrokerError> {
    let rows: Vec<Instance> = instances::table
        .filter(instances::pool_name.eq(&pool.name))
        .filter(instances::state.ne(State::Terminated))
        .select(Instance::as_select())
        .load(conn)
        .await?;
    let mut counts = PoolCounts::default();
    rows.iter().for_each(|row| counts.count(row));
    let mut errored: BTreeMap<_, String> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.state == State::Errored) {
        if let Some(reason) = &row.error_reason {
            errored.insert(
                std::cmp::Reverse((row.updated_at, row.id.0)),
                reason.clone(),
            );
        }
    }
    Ok(PoolStatus {
        pool,
        counts,
        last_errors: errored.into_values().take(LAST_ERRORS).collect(),
    })
}
