//! The instance state machine: which state may follow which, the one guarded update
//! through which every change of state goes, and [`apply`], which writes a
//! [`Decision`] of [`super::lifecycle`] through it.

use crate::ids::InstanceId;
use chrono::Utc;
use diesel::prelude::*;
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

/// Moves instance `id` to `to` if its current state allows it, applying `change` and
/// writing an `instance_events` row, on the caller's connection (inside its transaction).
///
/// Returns the updated row, or `None` when the instance does not exist or its state does
/// not allow the move (a late or repeated change is a no-op, never a step backwards).
#[tracing::instrument(level = "debug", skip(conn, reason, change), fields(instance.id = %id, to = to.as_str()))]
pub async fn transition(
    conn: &mut AsyncPgConnection,
    id: InstanceId,
    to: State,
    reason: Option<&str>,
    change: InstanceChange<'_>,
) -> QueryResult<Option<Instance>> {
    let allowed = to.predecessors();
    // Lock the row first so the event records the state actually left.
    let Some(from) = instances::table
        .find(id)
        .select(instances::state)
        .for_update()
        .first::<State>(conn)
        .await
        .optional()?
    else {
        return Ok(None);
    };
    let terminated_at = (to == State::Terminated).then(Utc::now);
    let updated = diesel::update(
        instances::table
            .filter(instances::id.eq(id))
            .filter(instances::state.eq_any(allowed)),
    )
    .set((
        instances::state.eq(to),
        instances::updated_at.eq(diesel::dsl::now),
        instances::terminated_at.eq(terminated_at),
        change,
    ))
    .returning(Instance::as_returning())
    .cached()
    .get_result(conn)
    .await
    .optional()?;
    if updated.is_some() {
        record_event(conn, id, Some(from), to, reason).await?;
    }
    Ok(updated)
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
            // with its remove job): for a row already there it only notes what is new.
            let moves = *to != State::Terminating;
            if moves {
                if let Some(updated) = transition(conn, id, *to, None, seen_change(seen)).await? {
                    tracing::info!(state = to.as_str(), "instance {id} {}", to.as_str());
                    return Ok(Some(updated));
                }
            }
            // Same state (or the row moved on): only fill in what the cloud newly says, and
            // only on a row whose machine still stands.
            let standing = [State::Starting, State::Running, State::Terminating];
            diesel::update(
                instances::table
                    .filter(instances::id.eq(id))
                    .filter(instances::state.eq_any(standing)),
            )
            .set((
                instances::updated_at.eq(diesel::dsl::now),
                seen_change(seen),
            ))
            .returning(Instance::as_returning())
            .cached()
            .get_result(conn)
            .await
            .optional()
        }
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
                tracing::info!("instance {id} terminated");
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
