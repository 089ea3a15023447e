//! Instances: ask for one, read one, list them, give one back, read its timeline.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::lifecycle::{self, Decision};
use super::model::{Instance, InstanceEvent, NewInstance};
use super::pools;
use super::state::{apply, enqueues, State};
use super::validate::{IdempotencyKey, Lifetime, ProviderName, SshPublicKey};
use super::{Broker, BrokerError};
use crate::auth::{Caller, Scope};
use crate::db::batch::{BatchError, Batched, ReadFuture};
use crate::db::schema::{instance_events, instances};
use crate::db::{CacheStatement, Pool};
use crate::ids::InstanceId;
use crate::queue::JobKind;

/// Instances per page when the client does not say.
pub const DEFAULT_PAGE_SIZE: i64 = 100;
/// Most instances per page.
pub const MAX_PAGE_SIZE: i64 = 1000;

/// A request for a machine, as read from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateInstance {
    /// The pool to take a machine from, or to make one for.
    pub pool: Option<String>,
    /// The provider config's name (required without a pool).
    pub provider: Option<String>,
    /// The image to boot (required without a pool).
    pub image: Option<String>,
    /// The instance type; absent, empty or `default` means the provider's default type.
    pub instance_type: Option<String>,
    /// One OpenSSH public key line; absent or empty means none.
    pub public_ssh_key: Option<String>,
    /// How long the machine may live, in seconds; absent means the longest the broker gives.
    pub ttl_seconds: Option<u64>,
}

/// What the broker did with a [`CreateInstance`].
#[derive(Debug)]
pub struct Created {
    /// The instance, as it is now.
    pub instance: Instance,
    /// True when an earlier request with the same `Idempotency-Key` made it.
    pub replayed: bool,
}

/// A request to create, its parts checked.
#[derive(Clone, Copy)]
struct Asked<'a> {
    caller: Caller,
    request: &'a CreateInstance,
    public_ssh_key: Option<&'a SshPublicKey>,
    idempotency_key: Option<&'a IdempotencyKey>,
}

/// What [`Broker::make`] did.
enum Made {
    /// Wrote a new instance, or found the one its `Idempotency-Key` names.
    Written(Created),
    /// Gave the caller a warm machine, which may still be waiting for the caller's key.
    TookWarm(Created),
}

/// Which instances to list.
#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    /// Only instances in this state.
    pub state: Option<String>,
    /// Only instances on this provider.
    pub provider: Option<String>,
    /// Page size.
    pub limit: Option<i64>,
    /// Where the previous page ended.
    pub cursor: Option<String>,
}

/// One page of instances, newest first.
#[derive(Debug)]
pub struct InstancePage {
    /// The instances on this page.
    pub instances: Vec<Instance>,
    /// Pass this as `cursor` to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Whether `caller` may see `instance`: its own, or any for an admin.
pub(super) fn visible(caller: Caller, instance: &Instance) -> bool {
    caller.scope == Scope::Admin || instance.owner_token_id == Some(caller.token_id)
}

/// The state a filter names (field `state`).
pub(super) fn state_named(name: &str) -> Result<State, BrokerError> {
    State::parse(name).ok_or_else(|| {
        let names: Vec<&str> = State::ALL.iter().map(|s| s.as_str()).collect();
        BrokerError::invalid(
            "state",
            format!("state must be one of {}", names.join(", ")),
        )
    })
}

/// Instances read by id, batched: [`Broker::get_instance`]'s reads.
pub type InstanceReads = Batched<InstanceId, Instance, BrokerError>;

/// Reads under way at once for one broker (one per API worker thread): while both are,
/// the requests that come wait and share the next statement.
const INSTANCE_READS_IN_FLIGHT: usize = 2;

/// Batched reads of instances by id over `pool`.
pub(super) fn instance_reads(pool: Pool) -> InstanceReads {
    Batched::new(
        INSTANCE_READS_IN_FLIGHT,
        |instance: &Instance| instance.id,
        move |ids: Vec<InstanceId>| {
            let pool = pool.clone();
            Box::pin(async move {
                let mut conn = super::conn(&pool).await?;
                let found = instances::table
                    .filter(instances::id.eq_any(ids))
                    .select(Instance::as_select())
                    .load(&mut conn)
                    .await?;
                Ok(found)
            }) as ReadFuture<Instance, BrokerError>
        },
    )
}

/// Reads an instance the caller may see, optionally locking its row.
pub(super) async fn find_visible(
    conn: &mut AsyncPgConnection,
    caller: Caller,
    id: InstanceId,
    lock: bool,
) -> Result<Instance, BrokerError> {
    let query = instances::table.find(id).select(Instance::as_select());
    let instance = if lock {
        query.for_update().first(conn).await?
    } else {
        query.first(conn).await?
    };
    if !visible(caller, &instance) {
        return Err(BrokerError::NotFound);
    }
    Ok(instance)
}

/// How long a request with a key that took a warm machine waits for the key to be on it.
pub const KEY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How often it looks.
const KEY_POLL: std::time::Duration = std::time::Duration::from_millis(20);

impl Broker {
    /// Records a request for a machine and its `create` job in one transaction.
    pub async fn create_instance(
        &self,
        caller: Caller,
        request: CreateInstance,
        idempotency_key: Option<&str>,
    ) -> Result<Created, BrokerError> {
        // Travis CI's worker always sends the key, empty when it has none.
        let public_ssh_key = request
            .public_ssh_key
            .as_deref()
            .filter(|key| !key.trim().is_empty())
            .map(SshPublicKey::parse)
            .transpose()?;
        let idempotency_key = idempotency_key.map(IdempotencyKey::parse).transpose()?;
        let asked = Asked {
            caller,
            request: &request,
            public_ssh_key: public_ssh_key.as_ref(),
            idempotency_key: idempotency_key.as_ref(),
        };
        // A request with an Idempotency-Key reads its shape: only its insert's conflict
        // tells a replay.
        let offers = idempotency_key.is_none().then_some(&*self.offers);
        let made = match self.make(&asked, offers).await? {
            Some(made) => made,
            None => {
                // The catalog moved since the shape was remembered: nothing was written.
                self.offers.clear();
                (self.make(&asked, None).await?).ok_or_else(|| {
                    anyhow::anyhow!("a request whose shape was read anew was not written")
                })?
            }
        };
        match made {
            Made::Written(created) => Ok(created),
            Made::TookWarm(created) => self.with_key_on(created).await,
        }
    }

    /// Writes what `asked` asks for, its shape read or (with `offers`) remembered; `None`
    /// when it was remembered and the catalog has moved since (then nothing is written).
    async fn make(
        &self,
        asked: &Asked<'_>,
        offers: Option<&super::providers::OfferCache>,
    ) -> Result<Option<Made>, BrokerError> {
        let Asked {
            caller,
            request,
            public_ssh_key,
            idempotency_key,
        } = *asked;
        let mut conn = self.conn().await?;
        let shape = pools::shape_of(&mut conn, &self.key, offers, request).await?;
        let longest = match &shape.pool {
            Some(pool) => pools::pool_lifetime(&mut conn, pool, self.max_lifetime).await?,
            None => Lifetime::longest(None, shape.provider_lifetime, self.max_lifetime),
        };
        let lifetime = Lifetime::parse(request.ttl_seconds, longest)?;

        let id = InstanceId::new();
        let new = NewInstance {
            id,
            owner_token_id: Some(caller.token_id),
            provider_name: &shape.provider,
            image: &shape.image,
            instance_type: &shape.instance_type,
            public_ssh_key: public_ssh_key.map(SshPublicKey::as_str),
            state: State::Creating,
            idempotency_key: idempotency_key.map(IdempotencyKey::as_str),
            pool_name: shape.pool.as_ref().map(|pool| pool.name.as_str()),
        };
        // A warm machine booted before the caller's key was known: a request with a key
        // may take one only where the provider can put the key on it now.
        let warm = match (&shape.pool, public_ssh_key) {
            (Some(pool), None) => Some(pool),
            (Some(pool), Some(_)) => {
                let provider = super::validate::ProviderName::parse(&shape.provider)?;
                let offer = super::providers::find_offer(&mut conn, &self.key, &provider).await?;
                offer.is_some_and(|o| o.authorizes_keys).then_some(pool)
            }
            (None, _) => None,
        };
        if let Some(pool) = warm {
            let asked = request.ttl_seconds.and(lifetime);
            if let Some(created) = pools::take_idle(&mut conn, caller, pool, &new, asked).await? {
                // Its event, and with a key the key job it waits for.
                self.announce(true);
                return Ok(Some(Made::TookWarm(created)));
            }
        }
        let created = match (&shape.pool, shape.remembered_at) {
            // One statement, atomic on its own.
            (None, None) => insert_or_replay(&mut conn, caller, &new, lifetime).await?,
            // Without an Idempotency-Key nothing conflicts: no row is a moved catalog.
            (None, Some(version)) => {
                match insert_new(&mut conn, &new, lifetime, Some(version)).await? {
                    Some(instance) => Created {
                        instance,
                        replayed: false,
                    },
                    None => return Ok(None),
                }
            }
            (Some(pool), _) => {
                conn.transaction::<_, BrokerError, _>(async |conn| {
                    pools::reserve(conn, pool, 1).await?;
                    insert_or_replay(conn, caller, &new, lifetime).await
                })
                .await?
            }
        };
        if !created.replayed {
            self.announce(true);
            tracing::info!(
                instance.id = %id,
                provider = shape.provider.as_str(),
                pool = new.pool_name,
                token.id = %caller.token_id,
                "instance {id} requested on {}", shape.provider
            );
        }
        Ok(Some(Made::Written(created)))
    }

    /// `created` as it stands once a key job has put the caller's key on the warm machine
    /// it took (at once for a machine without a pending key), or after [`KEY_WAIT`], when
    /// the key is still on its way.
    async fn with_key_on(&self, created: Created) -> Result<Created, BrokerError> {
        let deadline = tokio::time::Instant::now() + KEY_WAIT;
        let mut instance = created.instance;
        while instance.key_pending_since.is_some()
            && instance.state == State::Running
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(KEY_POLL).await;
            let mut conn = self.conn().await?;
            instance = instances::table
                .find(instance.id)
                .select(Instance::as_select())
                .first(&mut conn)
                .await?;
        }
        Ok(Created {
            instance,
            replayed: created.replayed,
        })
    }

    /// Reads one instance the caller may see, terminated ones too: in one statement with
    /// the other reads asked for while reads were under way ([`InstanceReads`]).
    pub async fn get_instance(
        &self,
        caller: Caller,
        id: InstanceId,
    ) -> Result<Instance, BrokerError> {
        let instance = match self.instance_reads.get(id).await {
            Ok(Some(instance)) => instance,
            Ok(None) => return Err(BrokerError::NotFound),
            Err(BatchError::Read(error)) => return Err(error.shared()),
            Err(BatchError::Stopped) => return Err(BrokerError::Unavailable),
        };
        if !visible(caller, &instance) {
            return Err(BrokerError::NotFound);
        }
        Ok(instance)
    }

    /// Asks for an instance to be destroyed: `terminating` and a `remove` job, in one
    /// transaction. Asking again changes nothing.
    pub async fn delete_instance(
        &self,
        caller: Caller,
        id: InstanceId,
    ) -> Result<Instance, BrokerError> {
        let mut conn = self.conn().await?;
        conn.transaction::<_, BrokerError, _>(async |conn| {
            let instance = find_visible(conn, caller, id, true).await?;
            let id = instance.id;
            let decision = lifecycle::delete(instance.state, caller.token_id);
            match decision {
                // Already terminated, or terminating: asking again changes nothing.
                Decision::Gone | Decision::Keep => return Ok((instance, false)),
                _ => {}
            }
            let updated = apply(conn, id, &decision).await?.ok_or_else(|| {
                anyhow::anyhow!(
                    "instance {id} in state {} cannot terminate",
                    instance.state.as_str()
                )
            })?;
            Ok((updated, enqueues(&decision)))
        })
        .await
        .map(|(updated, enqueued)| {
            self.announce(enqueued);
            updated
        })
    }

    /// Lists the instances the caller may see, newest first, one page at a time.
    pub async fn list_instances(
        &self,
        caller: Caller,
        filter: InstanceFilter,
    ) -> Result<InstancePage, BrokerError> {
        let limit = filter.limit.unwrap_or(DEFAULT_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&limit) {
            return Err(BrokerError::invalid(
                "limit",
                format!("limit must be between 1 and {MAX_PAGE_SIZE}"),
            ));
        }
        let mut query = instances::table.into_boxed();
        if caller.scope != Scope::Admin {
            query = query.filter(instances::owner_token_id.eq(caller.token_id));
        }
        if let Some(state) = &filter.state {
            query = query.filter(instances::state.eq(state_named(state)?));
        }
        if let Some(provider) = &filter.provider {
            let provider = ProviderName::parse(provider)?;
            query = query.filter(instances::provider_name.eq(provider.as_str().to_owned()));
        }
        if let Some(cursor) = &filter.cursor {
            let (at, id) = decode_cursor(cursor)?;
            query = query.filter(
                instances::created_at
                    .lt(at)
                    .or(instances::created_at.eq(at).and(instances::id.lt(id))),
            );
        }
        let mut conn = self.conn().await?;
        let mut rows: Vec<Instance> = query
            .order((instances::created_at.desc(), instances::id.desc()))
            .limit(limit + 1)
            .select(Instance::as_select())
            .load(&mut conn)
            .await?;
        let next_cursor = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last()
                .map(|last| encode_cursor(last.created_at, last.id))
        } else {
            None
        };
        Ok(InstancePage {
            instances: rows,
            next_cursor,
        })
    }

    /// The state timeline of an instance the caller may see, oldest first.
    pub async fn instance_events(
        &self,
        caller: Caller,
        id: InstanceId,
    ) -> Result<Vec<InstanceEvent>, BrokerError> {
        let mut conn = self.conn().await?;
        let instance = find_visible(&mut conn, caller, id, false).await?;
        Ok(instance_events::table
            .filter(instance_events::instance_id.eq(instance.id))
            .order(instance_events::id)
            .select(InstanceEvent::as_select())
            .load(&mut conn)
            .await?)
    }
}

/// Answers a repeated `Idempotency-Key`: the same request gets the same instance, another
/// request is refused.
/// Inserts `new` with its lifetime, its first event and its `create` job, all in one
/// statement: one round trip, atomic without a transaction of its own. `None` when the
/// caller's `Idempotency-Key` already names an instance, or when `catalog` is given and
/// the catalog version is another (then nothing is written). The caller announces the job
/// and the event once they have committed.
pub(super) async fn insert_new(
    conn: &mut AsyncPgConnection,
    new: &NewInstance<'_>,
    lifetime: Option<Lifetime>,
    catalog: Option<i64>,
) -> Result<Option<Instance>, BrokerError> {
    use diesel::sql_types::{BigInt, Integer, Interval, Nullable, Text};
    // The lifetime counts from the row's own creation time, on the database's clock. The
    // job is the queue's, as `queue::enqueue` writes it.
    let inserted = diesel::sql_query(
        "WITH inserted AS ( \
             INSERT INTO instances (id, owner_token_id, provider_name, image, instance_type, \
                                    public_ssh_key, state, idempotency_key, pool_name, expires_at) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, now() + $10 \
             WHERE $12 IS NULL OR $12 = (SELECT version FROM catalog_version) \
             ON CONFLICT (owner_token_id, idempotency_key) DO NOTHING \
             RETURNING *), \
         event AS ( \
             INSERT INTO instance_events (instance_id, to_state) SELECT id, state FROM inserted), \
         job AS ( \
             INSERT INTO jobs (kind, instance_id) SELECT $11, id FROM inserted) \
         SELECT inserted.* FROM inserted",
    )
    .bind::<diesel::sql_types::Uuid, _>(new.id)
    .bind::<Nullable<Integer>, _>(new.owner_token_id)
    .bind::<Text, _>(new.provider_name)
    .bind::<Text, _>(new.image)
    .bind::<Text, _>(new.instance_type)
    .bind::<Nullable<Text>, _>(new.public_ssh_key)
    .bind::<Text, _>(new.state)
    .bind::<Nullable<Text>, _>(new.idempotency_key)
    .bind::<Nullable<Text>, _>(new.pool_name)
    .bind::<Nullable<Interval>, _>(lifetime.map(Lifetime::interval))
    .bind::<Text, _>(JobKind::CreateInstance)
    .bind::<Nullable<BigInt>, _>(catalog)
    .cached()
    .get_result::<Instance>(conn)
    .await
    .optional()?;
    Ok(inserted)
}

/// Inserts `new` ([`insert_new`]), or answers the request its `Idempotency-Key` already
/// names ([`replay`]).
async fn insert_or_replay(
    conn: &mut AsyncPgConnection,
    caller: Caller,
    new: &NewInstance<'_>,
    lifetime: Option<Lifetime>,
) -> Result<Created, BrokerError> {
    match insert_new(conn, new, lifetime, None).await? {
        Some(instance) => Ok(Created {
            instance,
            replayed: false,
        }),
        None => replay(conn, caller, new).await,
    }
}

/// The instance the caller's `Idempotency-Key` already names, if `new` asks for the same
/// machine; a conflict if it asks for another.
pub(super) async fn replay(
    conn: &mut AsyncPgConnection,
    caller: Caller,
    new: &NewInstance<'_>,
) -> Result<Created, BrokerError> {
    let instance: Instance = instances::table
        .filter(instances::owner_token_id.eq(caller.token_id))
        .filter(instances::idempotency_key.eq(new.idempotency_key))
        .select(Instance::as_select())
        .first(conn)
        .await?;
    let same = instance.provider_name == new.provider_name
        && instance.image == new.image
        && instance.instance_type == new.instance_type
        && instance.public_ssh_key.as_deref() == new.public_ssh_key;
    if !same {
        return Err(BrokerError::IdempotencyConflict);
    }
    Ok(Created {
        instance,
        replayed: true,
    })
}

/// The pattern of a cursor: the last instance's creation time in microseconds since 1970
/// (at most 17 digits: before the year 5138, inside every range Postgres and chrono
/// hold) and its id. Clients pass it back as they got it.
pub const CURSOR_PATTERN: &str =
    "^(0|[1-9][0-9]{0,16})\\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";

fn encode_cursor(at: DateTime<Utc>, id: InstanceId) -> String {
    format!("{}.{}", at.timestamp_micros().max(0), id.0.hyphenated())
}

fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, InstanceId), BrokerError> {
    let invalid = || BrokerError::invalid("cursor", "cursor is not one this server handed out");
    let (micros, id) = cursor.split_once('.').ok_or_else(invalid)?;
    let well_formed = !micros.is_empty()
        && micros.len() <= 17
        && micros.bytes().all(|b| b.is_ascii_digit())
        && (micros == "0" || !micros.starts_with('0'));
    if !well_formed {
        return Err(invalid());
    }
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(invalid)?;
    let id = Uuid::parse_str(id)
        .ok()
        .filter(|parsed| parsed.hyphenated().to_string() == id)
        .ok_or_else(invalid)?;
    Ok((at, InstanceId(id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let id = InstanceId::new();
        let cursor = encode_cursor(at, id);
        assert_eq!(decode_cursor(&cursor).unwrap(), (at, id));
        let pattern = regex::Regex::new(CURSOR_PATTERN).unwrap();
        assert!(pattern.is_match(&cursor));
        let upper = cursor.to_uppercase();
        let far = format!("99999999999999999999.{id}");
        let past = format!("-62135596800000001.{id}");
        let padded = format!("0{cursor}");
        for junk in [
            "",
            "!!",
            "bm9wZQ",
            &cursor[3..],
            &upper,
            &far,
            &past,
            &padded,
            &format!("{}.{}", 5, id.0.simple()),
        ] {
            assert!(decode_cursor(junk).is_err(), "{junk:?}");
            assert!(!pattern.is_match(junk), "{junk:?}");
        }
    }
}
