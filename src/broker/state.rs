//! The instance state machine: which state may follow which, the one guarded update
//! through which every change of state goes, and [`apply`], which writes a
//! [`Decision`] of [`super::lifecycle`] through it.

use crate::ids::InstanceId;
use chrono::Utc;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};

use super::lifecycle::{Decision, Seen};
use super::model::{Instance, InstanceChange, NewInstanceEvent};
use crate::db::schema::{instance_events, instances};
use crate::db::CacheStatement;
use crate::queue::{self, JobKind};

crate::text_enum! {
    /// Where an instance is in its life; stored by name in `instances.state`.
    #[derive(Hash, Serialize, Deserialize, utoipa::ToSchema)]
    #[serde(rename_all = "lowercase")]
    pub enum State {
        /// Recorded; its create job has not made the machine yet.
        Creating => "creating",
        /// The cloud accepted the machine; it is booting.
        Starting => "starting",
        /// The machine is up.
        Running => "running",
        /// Asked to go away; its remove job is destroying the machine.
        Terminating => "terminating",
        /// The machine is gone. Final.
        Terminated => "terminated",
        /// Something went wrong that waiting will not fix; `error_reason` says what.
        Errored => "errored",
    }
}

impl State {
    /// The states this one may be entered from. Nothing re-enters an earlier state, and
    /// nothing leaves `terminated`.
    pub fn predecessors(self) -> &'static [State] {
        use State::*;
        match self {
            Creating => &[],
            Starting => &[Creating],
            Running => &[Creating, Starting],
            Terminating => &[Creating, Starting, Running, Errored],
            Terminated => &[Terminating],
            Errored => &[Creating, Starting, Running, Terminating],
        }
    }
}

/// The statement every change of state goes through, up to what it answers: `old` locks
/// the row, `moved` changes it if the state it is in allows the move, `event` records the
/// move. Its parameters are those [`moving`] binds.
macro_rules! transition_cte {
    () => {
        "WITH old AS (SELECT id, state FROM instances WHERE id = $1 FOR UPDATE), \
         moved AS ( \
             UPDATE instances AS i \
             SET state = $2, updated_at = now(), terminated_at = $3, \
                 upstream_id = COALESCE($4, i.upstream_id), \
                 ip_address = COALESCE($5, i.ip_address), \
                 error_reason = COALESCE($6, i.error_reason), \
                 details = COALESCE($7, i.details) \
             FROM old WHERE i.id = old.id AND old.state = ANY ($8) \
             RETURNING i.*, old.state AS from_state), \
         event AS ( \
             INSERT INTO instance_events (instance_id, from_state, to_state, reason) \
             SELECT id, from_state, state, $9 FROM moved)"
    };
}

/// `sql`, a statement that begins with [`transition_cte`], with the move's parameters
/// bound ($1 to $9).
fn moving<'a>(
    sql: &'static str,
    id: InstanceId,
    to: State,
    reason: Option<&'a str>,
    change: InstanceChange<'a>,
) -> BoxedSqlQuery<'a, Pg, SqlQuery> {
    use diesel::sql_types::{Array, Jsonb, Nullable, Text, Timestamptz};
    let terminated_at = (to == State::Terminated).then(Utc::now);
    diesel::sql_query(sql)
        .into_boxed()
        .bind::<diesel::sql_types::Uuid, _>(id)
        .bind::<Text, _>(to)
        .bind::<Nullable<Timestamptz>, _>(terminated_at)
        .bind::<Nullable<Text>, _>(change.upstream_id)
        .bind::<Nullable<Text>, _>(change.ip_address)
        .bind::<Nullable<Text>, _>(change.error_reason)
        .bind::<Nullable<Jsonb>, _>(change.details)
        .bind::<Array<Text>, _>(to.predecessors())
        .bind::<Nullable<Text>, _>(reason)
}

/// Moves instance `id` to `to` if its current state allows it, applying `change` and
/// writing an `instance_events` row, on the caller's connection (inside its transaction).
///
/// Returns the updated row, or `None` when the instance does not exist or its state does
/// not allow the move (a late or repeated change is a no-op, never a step backwards).
///
/// One statement: the row is locked first, so the event records the state actually left
/// and the guard judges the state as it is once the lock is held; `change`'s absent fields
/// keep their values.
#[tracing::instrument(level = "debug", skip(conn, reason, change), fields(instance.id = %id, to = to.as_str()))]
pub async fn transition(
    conn: &mut AsyncPgConnection,
    id: InstanceId,
    to: State,
    reason: Option<&str>,
    change: InstanceChange<'_>,
) -> QueryResult<Option<Instance>> {
    moving(
        concat!(transition_cte!(), " SELECT * FROM moved"),
        id,
        to,
        reason,
        change,
    )
    .cached()
    .get_result::<Instance>(conn)
    .await
    .optional()
}

/// The row a move-and-finish statement answers when the move was written: whether the
/// job was finished with it.
#[derive(QueryableByName)]
struct Finished {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    finished: bool,
}

/// Writes `decision` and finishes the job `lease` in one statement, with no transaction
/// around it (one round trip, not the four of a transaction), when `decision` is a move to
/// a state that [`transition`] alone writes (recording what the cloud says, or
/// `terminated`) and the row's state allows it.
///
/// `Some(held)` when it was written, `held` being whether the worker still held the job
/// (then it is finished; if not, what the cloud said is recorded all the same, as
/// [`apply`] would). `None` when nothing was written: the caller writes the decision the
/// general way, [`apply`] and [`queue::finish`] in one transaction.
#[tracing::instrument(level = "debug", skip_all, fields(instance.id = %lease.instance_id))]
pub async fn apply_finishing(
    conn: &mut AsyncPgConnection,
    lease: &queue::Lease,
    decision: &Decision,
) -> QueryResult<Option<bool>> {
    use diesel::sql_types::{BigInt, Text};
    let (to, change) = match decision {
        Decision::Record { to, seen } if *to != State::Terminating => (*to, seen_change(seen)),
        Decision::Terminate => (State::Terminated, InstanceChange::default()),
        _ => return Ok(None),
    };
    let id = lease.instance_id;
    let written = moving(
        concat!(
            transition_cte!(),
            ", ",
            crate::queue::finish_held_cte!("finished", "$10", "$11", "moved"),
            " SELECT EXISTS (SELECT 1 FROM finished) AS finished FROM moved"
        ),
        id,
        to,
        None,
        change,
    )
    .bind::<BigInt, _>(lease.job_id)
    .bind::<Text, _>(&lease.worker)
    .cached()
    .get_result::<Finished>(conn)
    .await
    .optional()?;
    Ok(written.map(|row| {
        moved_to(id, to);
        row.finished
    }))
}

/// Logs a move that was written.
fn moved_to(id: InstanceId, to: State) {
    tracing::info!(state = to.as_str(), "instance {id} {}", to.as_str());
}

/// True when [`apply`] enqueues a job for `decision` (a remove job, when termination
/// begins): its caller announces the job once the transaction commits.
pub fn enqueues(decision: &Decision) -> bool {
    matches!(decision, Decision::BeginTermination { .. })
}

/// Writes `decision` for instance `id` on the caller's connection (inside its
/// transaction) and returns the row as it is now, or `None` when nothing was written (a
/// decision with nothing to write, a row gone, or a state that no longer allows it).
#[tracing::instrument(level = "debug", skip(conn, decision), fields(instance.id = %id))]
pub async fn apply(
    conn: &mut AsyncPgConnection,
    id: InstanceId,
    decision: &Decision,
) -> QueryResult<Option<Instance>> {
    match decision {
        Decision::Keep | Decision::Destroy | Decision::Gone | Decision::NotYet(_) => Ok(None),
        Decision::Record { to, seen } => {
            // Recording never moves a row into `terminating` (only BeginTermination does,
            // with its remove job).
            if *to != State::Terminating {
                if let Some(updated) = transition(conn, id, *to, None, seen_change(seen)).await? {
                    moved_to(id, *to);
                    return Ok(Some(updated));
                }
            }
            // The row moved on: only fill in what the cloud newly says.
            note_one(conn, id, seen).await
        }
        Decision::Note(seen) => note_one(conn, id, seen).await,
        Decision::Fail { reason, seen } => {
            let change = InstanceChange {
                error_reason: Some(reason),
                ..seen.as_ref().map(seen_change).unwrap_or_default()
            };
            let updated = transition(conn, id, State::Errored, Some(reason), change).await?;
            // Its create job, if nobody holds it, has nothing left to do.
            queue::drop_unclaimed(conn, JobKind::CreateInstance, id).await?;
            if updated.is_some() {
                tracing::warn!(reason = reason.as_str(), "instance {id} errored");
            }
            Ok(updated)
        }
        Decision::Terminate => {
            let updated =
                transition(conn, id, State::Terminated, None, InstanceChange::default()).await?;
            if updated.is_some() {
                moved_to(id, State::Terminated);
            }
            Ok(updated)
        }
        Decision::KeyAuthorized => {
            let cleared = diesel::update(instances::table.find(id))
                .filter(instances::state.eq(State::Running))
                .filter(instances::key_pending_since.is_not_null())
                .set((
                    instances::key_pending_since.eq(None::<chrono::DateTime<chrono::Utc>>),
                    instances::updated_at.eq(diesel::dsl::now),
                ))
                .returning(Instance::as_returning())
                .cached()
                .get_result(conn)
                .await
                .optional()?;
            if cleared.is_some() {
                let (from, to) = (Some(State::Running), State::Running);
                let reason = Some("the caller's key is on the machine");
                record_event(conn, id, from, to, reason).await?;
            }
            Ok(cleared)
        }
        Decision::BeginTermination { reason } => {
            let change = InstanceChange::default();
            let updated = transition(conn, id, State::Terminating, Some(reason), change).await?;
            if updated.is_some() {
                // A machine nobody started making needs no making; the remove job still
                // runs, because an earlier attempt may have made one.
                queue::drop_unclaimed(conn, JobKind::CreateInstance, id).await?;
                queue::enqueue(conn, JobKind::RemoveInstance, id).await?;
                tracing::info!(reason = reason.as_str(), "instance {id} terminating");
            }
            Ok(updated)
        }
    }
}

/// The states of a row whose machine still stands.
const STANDING: &[State] = &[State::Starting, State::Running, State::Terminating];

/// Writes what the cloud newly says of each machine, in one statement, to the rows whose
/// machine still stands (`starting`, `running`, `terminating`); their state stays and no
/// event is written. Returns how many rows it wrote.
pub async fn note_all(
    conn: &mut AsyncPgConnection,
    notes: &[(InstanceId, &Seen)],
) -> QueryResult<usize> {
    use diesel::sql_types::{Array, Jsonb, Nullable, Text, Uuid};
    if notes.is_empty() {
        return Ok(0);
    }
    let ids: Vec<uuid::Uuid> = notes.iter().map(|(id, _)| id.0).collect();
    let upstream: Vec<&str> = notes.iter().map(|(_, s)| s.upstream_id.as_str()).collect();
    let addresses: Vec<Option<&str>> = notes.iter().map(|(_, s)| s.ip_address.as_deref()).collect();
    let details: Vec<Option<&serde_json::Value>> =
        notes.iter().map(|(_, s)| s.details.as_ref()).collect();
    diesel::sql_query(
        "UPDATE instances AS i SET upstream_id = n.upstream_id, \
                ip_address = COALESCE(n.ip_address, i.ip_address), \
                details = COALESCE(n.details, i.details), updated_at = now() \
         FROM unnest($1, $2, $3, $4) AS n (id, upstream_id, ip_address, details) \
         WHERE i.id = n.id AND i.state = ANY ($5)",
    )
    .bind::<Array<Uuid>, _>(ids)
    .bind::<Array<Text>, _>(upstream)
    .bind::<Array<Nullable<Text>>, _>(addresses)
    .bind::<Array<Nullable<Jsonb>>, _>(details)
    .bind::<Array<Text>, _>(STANDING)
    .cached()
    .execute(conn)
    .await
}

/// [`note_all`] for one row, and the row as it is now if it was written.
async fn note_one(
    conn: &mut AsyncPgConnection,
    id: InstanceId,
    seen: &Seen,
) -> QueryResult<Option<Instance>> {
    if note_all(conn, &[(id, seen)]).await? == 0 {
        return Ok(None);
    }
    instances::table
        .find(id)
        .select(Instance::as_select())
        .first(conn)
        .await
        .optional()
}

/// The columns that say what the cloud says of a machine.
fn seen_change(seen: &Seen) -> InstanceChange<'_> {
    InstanceChange {
        upstream_id: Some(&seen.upstream_id),
        ip_address: seen.ip_address.as_deref(),
        error_reason: None,
        details: seen.details.as_ref(),
    }
}

/// Writes one `instance_events` row.
pub async fn record_event(
    conn: &mut AsyncPgConnection,
    instance_id: InstanceId,
    from: Option<State>,
    to: State,
    reason: Option<&str>,
) -> QueryResult<()> {
    diesel::insert_into(instance_events::table)
        .values(NewInstanceEvent {
            instance_id,
            from_state: from,
            to_state: to,
            reason,
        })
        .cached()
        .execute(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order of an instance's life; `errored` stands beside it.
    fn rank(state: State) -> Option<usize> {
        State::ALL[..5].iter().position(|s| *s == state)
    }

    #[test]
    fn no_state_can_be_entered_from_a_later_one() {
        for &to in State::ALL {
            for from in to.predecessors() {
                assert_ne!(*from, State::Terminated, "{to:?} leaves terminated");
                if let (Some(f), Some(t)) = (rank(*from), rank(to)) {
                    assert!(f < t, "{from:?} -> {to:?} goes backwards");
                }
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for &state in State::ALL {
            assert_eq!(State::parse(state.as_str()), Some(state));
        }
        assert_eq!(State::parse("stopped"), None);
    }
}
