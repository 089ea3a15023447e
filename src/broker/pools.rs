//! Pools: named shapes of machine kept warm. Admins write a pool's shape and size; any
//! token reads them with the counts of their instances.

use std::collections::BTreeMap;

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::instances::{insert_new, replay, CreateInstance, Created};
use super::lifecycle::Decision;
use super::model::{Instance, NewInstance, NewPool, PoolRow};
use super::providers::{offered, offered_type, OfferCache};
use super::state::{apply, record_event, State};
use super::validate::{ImageName, Lifetime, PoolName, ProviderName};
use super::{Broker, BrokerError};
use crate::auth::Caller;
use crate::crypto::SecretKey;
use crate::db::schema::{instances, pools};
use crate::ids::InstanceId;

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
    /// The offerings to fall back to, in order, when its own shape has no room.
    pub fallbacks: Vec<super::offerings::Fallback>,
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
    /// Its live instances, oldest first.
    pub machines: Vec<PoolMachine>,
}

/// One live instance of a pool.
#[derive(Debug, Clone)]
pub struct PoolMachine {
    /// The instance.
    pub id: crate::ids::InstanceId,
    /// Its state.
    pub state: State,
    /// Whether a client holds it.
    pub assigned: bool,
    /// What its provider says of its machine beyond the contract (`ecs`, …).
    pub details: Option<serde_json::Value>,
}

fn admin_only(caller: Caller) -> Result<(), BrokerError> {
    super::admin_only(caller, "change pools")
}

/// The name of a pool that is to exist already: one that is not a name names no pool.
fn existing(name: &str) -> Result<PoolName, BrokerError> {
    PoolName::parse(name).map_err(|_not_a_name| BrokerError::NoSuchPool(name.to_owned()))
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
        let mut conn = self.conn().await?;
        put(&mut conn, &self.key, self.max_lifetime, name, &spec).await
    }

    /// Sets how many idle machines pool `name` keeps (admin only), as Barcelona's scale.
    pub async fn scale_pool(
        &self,
        caller: Caller,
        name: &str,
        min_idle: u32,
    ) -> Result<PoolStatus, BrokerError> {
        admin_only(caller)?;
        let mut conn = self.conn().await?;
        scale(&mut conn, name, min_idle).await
    }

    /// Removes pool `name` (admin only): its idle and booting machines are destroyed,
    /// machines clients hold stay theirs until given back. The pool as it was is returned.
    pub async fn delete_pool(&self, caller: Caller, name: &str) -> Result<PoolStatus, BrokerError> {
        admin_only(caller)?;
        let mut conn = self.conn().await?;
        let deleted = delete(&mut conn, name).await?;
        // Its drained machines' events and remove jobs.
        self.announce(true);
        Ok(deleted)
    }

    /// Every pool, by name, with its counts.
    pub async fn pools(&self) -> Result<Vec<PoolStatus>, BrokerError> {
        let mut conn = self.conn().await?;
        list(&mut conn).await
    }

    /// Pool `name` with its counts.
    pub async fn pool(&self, name: &str) -> Result<PoolStatus, BrokerError> {
        let name = existing(name)?;
        let mut conn = self.conn().await?;
        status(&mut conn, &name).await
    }
}

/// Makes pool `name` or changes its shape and size, checked against the provider's offer
/// and the broker's longest lifetime `max_lifetime` (for an operator, or an admin token).
pub async fn put(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    max_lifetime: Option<std::time::Duration>,
    name: &str,
    spec: &PoolSpec,
) -> Result<PoolStatus, BrokerError> {
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
        Lifetime::check_bound("max_lifetime_secs", secs, max_lifetime)?;
    }
    let (instance_type, _) =
        offered_type(conn, key, &provider, spec.instance_type.as_deref()).await?;
    super::offerings::check_fallbacks(conn, key, provider.as_str(), &spec.fallbacks).await?;
    let fallbacks = serde_json::to_value(&spec.fallbacks)
        .map_err(|e| BrokerError::Internal(anyhow::anyhow!("fallbacks: {e}")))?;
    let new = NewPool {
        name: name.as_str(),
        provider_name: provider.as_str(),
        image: image.as_str(),
        instance_type: &instance_type,
        min_idle: i32::try_from(spec.min_idle).unwrap_or(i32::MAX),
        max_size: i32::try_from(spec.max_size).unwrap_or(i32::MAX),
        max_lifetime_secs: spec.max_lifetime_secs.and_then(|s| i64::try_from(s).ok()),
        fallbacks,
    };
    diesel::insert_into(pools::table)
        .values(&new)
        .on_conflict(pools::name)
        .do_update()
        .set((&new, pools::updated_at.eq(diesel::dsl::now)))
        .execute(conn)
        .await?;
    tracing::info!(pool = name.as_str(), "pool {} written", name.as_str());
    status(conn, &name).await
}

/// Removes pool `name`: its unassigned machines are destroyed, machines clients hold stay
/// theirs (for an operator, or an admin token). The pool as it was is returned.
pub async fn delete(conn: &mut AsyncPgConnection, name: &str) -> Result<PoolStatus, BrokerError> {
    let name = existing(name)?;
    let before = status(conn, &name).await?;
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

/// Every pool, by name, with its counts (for an operator, or a token through the API).
pub async fn list(conn: &mut AsyncPgConnection) -> Result<Vec<PoolStatus>, BrokerError> {
    let rows: Vec<PoolRow> = pools::table
        .order(pools::name)
        .select(PoolRow::as_select())
        .load(conn)
        .await?;
    let mut all = Vec::with_capacity(rows.len());
    for pool in rows {
        all.push(with_counts(conn, pool).await?);
    }
    Ok(all)
}

/// Sets how many idle machines pool `name` keeps, at most its `max_size` (for an
/// operator, or an admin token through the API).
pub async fn scale(
    conn: &mut AsyncPgConnection,
    name: &str,
    min_idle: u32,
) -> Result<PoolStatus, BrokerError> {
    let name = existing(name)?;
    let pool = find(conn, &name).await?;
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
        .execute(conn)
        .await?;
    tracing::info!(
        pool = name.as_str(),
        min_idle,
        "pool {} scaled",
        name.as_str()
    );
    status(conn, &name).await
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
    let mut live: Vec<&Instance> = rows.iter().filter(|r| r.state != State::Errored).collect();
    live.sort_by_key(|row| (row.created_at, row.id.0));
    let machines = live
        .into_iter()
        .map(|row| PoolMachine {
            id: row.id,
            state: row.state,
            assigned: row.owner_token_id.is_some(),
            details: row.details.clone(),
        })
        .collect();
    Ok(PoolStatus {
        pool,
        counts,
        last_errors: errored.into_values().take(LAST_ERRORS).collect(),
        machines,
    })
}

/// What a pool's worker does in one cycle: make machines, and retire unassigned ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    /// New unassigned machines to ask for.
    pub make: u32,
    /// Unassigned machines to destroy.
    pub retire: u32,
}

/// What keeps `pool` at its size, given how its instances stand: unassigned machines
/// (idle or booting) up to `min_idle`, never more live instances than `max_size`, and
/// only unassigned machines retired, never one a client holds.
pub fn plan(min_idle: u32, max_size: u32, counts: &PoolCounts) -> Plan {
    let unassigned = counts.idle + counts.starting;
    let room = max_size.saturating_sub(counts.live());
    let make = min_idle.saturating_sub(unassigned).min(room);
    let above_min = unassigned.saturating_sub(min_idle);
    let above_max = counts.live().saturating_sub(max_size).min(unassigned);
    Plan {
        make,
        retire: above_min.max(above_max),
    }
}

/// The shape of machine a request asks for, and the pool that makes that shape, if any.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The pool named, or the pool whose shape the request matches.
    pub pool: Option<PoolRow>,
    /// The provider config.
    pub provider: String,
    /// The image.
    pub image: String,
    /// The instance type.
    pub instance_type: String,
    /// The provider's longest lifetime, in seconds, when the request names no pool
    /// (read with its offer).
    pub provider_lifetime: Option<u64>,
    /// When the shape was taken from what the process remembers, the catalog version it
    /// was read at: the request's instance is written only if the catalog is still there.
    pub remembered_at: Option<i64>,
}

/// The shape `request` asks for: its pool's (fields it also names must agree), or its
/// own provider, image and type, taken from a pool of exactly that shape when there is
/// one. With `offers`, a request that names no pool takes its shape from what they
/// remember when that has no pool of the shape (`remembered_at` says so), and what is
/// read is remembered.
pub(super) async fn shape_of(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    offers: Option<&OfferCache>,
    request: &CreateInstance,
) -> Result<Shape, BrokerError> {
    if let Some(name) = &request.pool {
        let unknown = || BrokerError::invalid("pool", format!("pool {name:?} does not exist"));
        let name = PoolName::parse(name).map_err(|_not_a_name| unknown())?;
        let pool = find(conn, &name).await.map_err(|_missing| unknown())?;
        let asked_type = request
            .instance_type
            .as_deref()
            .filter(|t| !t.is_empty() && *t != cloudbrain_provider::DEFAULT_TYPE_ALIAS);
        for (field, asked, made) in [
            ("provider", request.provider.as_deref(), &pool.provider_name),
            ("image", request.image.as_deref(), &pool.image),
            ("instance_type", asked_type, &pool.instance_type),
        ] {
            if asked.is_some_and(|asked| asked != made) {
                return Err(BrokerError::invalid(
                    field,
                    format!(
                        "pool {:?} makes machines with {field} {made:?}; name that or leave {field} out",
                        pool.name
                    ),
                ));
            }
        }
        return Ok(Shape {
            provider: pool.provider_name.clone(),
            image: pool.image.clone(),
            instance_type: pool.instance_type.clone(),
            pool: Some(pool),
            provider_lifetime: None,
            remembered_at: None,
        });
    }
    let required = |field: &'static str, value: &Option<String>| {
        value
            .clone()
            .ok_or_else(|| BrokerError::invalid(field, format!("{field} is required")))
    };
    let provider = ProviderName::parse(&required("provider", &request.provider)?)?;
    let image = ImageName::parse(&required("image", &request.image)?)?;
    let shape = |offered: &super::providers::Offered, remembered: bool| {
        let (instance_type, pool) = offered.shape(&provider, request.instance_type.as_deref())?;
        Ok::<_, BrokerError>(Shape {
            remembered_at: (remembered && pool.is_none()).then_some(offered.version()),
            pool: pool.cloned(),
            provider: provider.as_str().to_owned(),
            image: image.as_str().to_owned(),
            instance_type,
            provider_lifetime: offered.policy().max_lifetime_secs,
        })
    };
    // Only a shape with no pool is taken from memory (a pool's row is locked and read
    // anew by the request that uses it); a refusal is always read anew.
    let remembered = offers.and_then(|offers| offers.get(provider.as_str(), image.as_str()));
    if let Some(Ok(shape @ Shape { pool: None, .. })) =
        remembered.map(|offered| shape(&offered, true))
    {
        return Ok(shape);
    }
    let offered = offered(conn, key, &provider, &image).await?;
    let shape = shape(&offered, false)?;
    if let Some(offers) = offers {
        offers.keep(provider.as_str(), image.as_str(), offered);
    }
    Ok(shape)
}

/// The longest a machine of `pool` lives: the shorter of its own bound and its
/// provider's, else the broker's, `broker`.
pub(super) async fn pool_lifetime(
    conn: &mut AsyncPgConnection,
    pool: &PoolRow,
    broker: Option<std::time::Duration>,
) -> Result<Option<std::time::Duration>, BrokerError> {
    let provider = super::providers::policy_of(conn, &pool.provider_name)
        .await?
        .and_then(|p| p.max_lifetime_secs);
    let own = pool.max_lifetime_secs.and_then(|s| u64::try_from(s).ok());
    Ok(Lifetime::longest(own, provider, broker))
}

/// Hands the caller an idle running machine of `pool` as `new` asks (its token, its
/// `Idempotency-Key`, a shorter lifetime when `asked`); `None` when the pool has none
/// idle. Two requests never get the same machine (`SKIP LOCKED`).
pub(super) async fn take_idle(
    conn: &mut AsyncPgConnection,
    caller: Caller,
    pool: &PoolRow,
    new: &NewInstance<'_>,
    asked: Option<Lifetime>,
) -> Result<Option<Created>, BrokerError> {
    if new.idempotency_key.is_some() {
        let earlier = instances::table
            .filter(instances::owner_token_id.eq(caller.token_id))
            .filter(instances::idempotency_key.eq(new.idempotency_key))
            .select(instances::id)
            .first::<InstanceId>(conn)
            .await
            .optional()?;
        if earlier.is_some() {
            return replay(conn, caller, new).await.map(Some);
        }
    }
    let taken = conn
        .transaction::<_, diesel::result::Error, _>(async |conn| {
            let Some(id) = instances::table
                .filter(instances::pool_name.eq(&pool.name))
                .filter(instances::owner_token_id.is_null())
                .filter(instances::state.eq(State::Running))
                .order(instances::created_at)
                .select(instances::id)
                .for_update()
                .skip_locked()
                .first::<InstanceId>(conn)
                .await
                .optional()?
            else {
                return Ok(None);
            };
            // least() passes over NULL: no lifetime asked keeps the machine's own.
            let expires_at = diesel::dsl::sql::<
                diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>,
            >("least(expires_at, now() + ")
            .bind::<diesel::sql_types::Nullable<diesel::sql_types::Interval>, _>(
                asked.map(Lifetime::interval),
            )
            .sql(")");
            // With a key, a key job puts the key on it; the request waits for that.
            let keyed = new.public_ssh_key.is_some();
            let pending = diesel::dsl::sql::<
                diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>,
            >(if keyed { "now()" } else { "NULL" });
            let instance: Instance = diesel::update(instances::table.find(id))
                .set((
                    instances::owner_token_id.eq(caller.token_id),
                    instances::assigned_at.eq(diesel::dsl::now),
                    instances::idempotency_key.eq(new.idempotency_key),
                    instances::expires_at.eq(expires_at),
                    instances::public_ssh_key.eq(new.public_ssh_key),
                    instances::key_pending_since.eq(pending),
                    instances::updated_at.eq(diesel::dsl::now),
                ))
                .returning(Instance::as_returning())
                .get_result(conn)
                .await?;
            let mut reason = format!("taken from pool {} by token {}", pool.name, caller.token_id);
            if keyed {
                reason.push_str("; its key is being put on the machine");
                crate::queue::enqueue(conn, crate::queue::JobKind::AuthorizeKey, id).await?;
            }
            let (from, to) = (Some(State::Running), State::Running);
            record_event(conn, id, from, to, Some(&reason)).await?;
            Ok(Some(instance))
        })
        .await;
    match taken {
        Ok(Some(instance)) => {
            tracing::info!(
                instance.id = %instance.id,
                pool = pool.name.as_str(),
                token.id = %caller.token_id,
                "instance {} taken from pool {}", instance.id, pool.name
            );
            Ok(Some(Created {
                instance,
                replayed: false,
            }))
        }
        Ok(None) => Ok(None),
        // The same key, taken by a request of the same token a moment ago.
        Err(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation,
            _,
        )) => replay(conn, caller, new).await.map(Some),
        Err(other) => Err(other.into()),
    }
}

/// Locks `pool`'s row and refuses if `more` instances would take it past `max_size`.
/// Every instance of a pool is made under this lock, by any process, so the bound holds.
pub(super) async fn reserve(
    conn: &mut AsyncPgConnection,
    pool: &PoolRow,
    more: u32,
) -> Result<PoolCounts, BrokerError> {
    let locked: PoolRow = pools::table
        .find(&pool.name)
        .select(PoolRow::as_select())
        .for_update()
        .first(conn)
        .await?;
    let status = with_counts(conn, locked).await?;
    let max_size = u32::try_from(status.pool.max_size).unwrap_or_default();
    if status.counts.live() + more > max_size {
        return Err(BrokerError::PoolFull {
            pool: pool.name.clone(),
            max_size,
        });
    }
    Ok(status.counts)
}

impl Broker {
    /// Brings every pool to its size (see [`plan`]); what each pool's cycle did, by name.
    pub async fn reconcile_pools(&self) -> Result<Vec<(String, Plan)>, BrokerError> {
        let mut conn = self.conn().await?;
        let names: Vec<String> = pools::table
            .order(pools::name)
            .select(pools::name)
            .load(&mut conn)
            .await?;
        let mut done = Vec::with_capacity(names.len());
        for name in names {
            let plan = self.reconcile_pool(&mut conn, &name).await?;
            done.push((name, plan));
        }
        if done.iter().any(|(_, plan)| *plan != Plan::default()) {
            // The new machines' create jobs, the retired ones' remove jobs.
            self.announce(true);
        }
        Ok(done)
    }

    async fn reconcile_pool(
        &self,
        conn: &mut AsyncPgConnection,
        name: &str,
    ) -> Result<Plan, BrokerError> {
        conn.transaction::<_, BrokerError, _>(async |conn| {
            let Some(pool) = pools::table
                .find(name)
                .select(PoolRow::as_select())
                .for_update()
                .first(conn)
                .await
                .optional()?
            else {
                return Ok(Plan::default());
            };
            let status = with_counts(conn, pool).await?;
            let pool = status.pool;
            let min_idle = u32::try_from(pool.min_idle).unwrap_or_default();
            let max_size = u32::try_from(pool.max_size).unwrap_or_default();
            let plan = plan(min_idle, max_size, &status.counts);
            let longest = pool_lifetime(conn, &pool, self.max_lifetime).await?;
            let lifetime = Lifetime::parse(None, longest)?;
            for _ in 0..plan.make {
                let new = NewInstance {
                    id: InstanceId::new(),
                    owner_token_id: None,
                    provider_name: &pool.provider_name,
                    image: &pool.image,
                    instance_type: &pool.instance_type,
                    public_ssh_key: None,
                    state: State::Creating,
                    idempotency_key: None,
                    pool_name: Some(&pool.name),
                };
                insert_new(conn, &new, lifetime, None).await?;
            }
            if plan.retire > 0 {
                // Booting machines first (nothing waits on them), then the oldest idle.
                let unassigned: Vec<Instance> = instances::table
                    .filter(instances::pool_name.eq(&pool.name))
                    .filter(instances::owner_token_id.is_null())
                    .filter(instances::state.eq_any([
                        State::Creating,
                        State::Starting,
                        State::Running,
                    ]))
                    .order((instances::state.eq(State::Running), instances::created_at))
                    .limit(i64::from(plan.retire))
                    .select(Instance::as_select())
                    .for_update()
                    .load(conn)
                    .await?;
                let retire = Decision::BeginTermination {
                    reason: format!("pool {} scaled in", pool.name),
                };
                for instance in unassigned {
                    apply(conn, instance.id, &retire).await?;
                }
            }
            if plan != Plan::default() {
                tracing::info!(
                    pool = pool.name.as_str(),
                    make = plan.make,
                    retire = plan.retire,
                    "pool {} reconciled",
                    pool.name
                );
            }
            Ok(plan)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(idle: u32, busy: u32, starting: u32) -> PoolCounts {
        PoolCounts {
            idle,
            busy,
            starting,
            ..PoolCounts::default()
        }
    }

    fn plan_of(make: u32, retire: u32) -> Plan {
        Plan { make, retire }
    }

    #[test]
    fn a_pool_fills_to_min_idle_within_max_size_and_retires_only_unassigned_machines() {
        // (min_idle, max_size, idle, busy, starting) → (make, retire)
        let table = [
            ((3, 10, 0, 0, 0), plan_of(3, 0)),
            ((3, 10, 1, 0, 1), plan_of(1, 0)),
            ((3, 10, 3, 5, 0), plan_of(0, 0)),
            ((3, 4, 0, 3, 0), plan_of(1, 0)),
            ((3, 4, 0, 4, 0), plan_of(0, 0)),
            ((3, 4, 0, 6, 0), plan_of(0, 0)),
            ((0, 4, 2, 1, 1), plan_of(0, 3)),
            ((1, 10, 4, 9, 0), plan_of(0, 3)),
            ((2, 3, 2, 3, 0), plan_of(0, 2)),
            ((2, 3, 1, 2, 1), plan_of(0, 1)),
        ];
        for ((min_idle, max_size, idle, busy, starting), expected) in table {
            let got = plan(min_idle, max_size, &counts(idle, busy, starting));
            assert_eq!(
                got, expected,
                "min_idle {min_idle}, max_size {max_size}, idle {idle}, busy {busy}, starting {starting}"
            );
        }
    }
}
