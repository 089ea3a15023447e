//! The instance state machine: which state may follow which, and the one guarded update
//! through which every change of state goes.

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::db::models::{Instance, InstanceChange, NewInstanceEvent};
use crate::db::schema::{instance_events, instances};

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
pub async fn transition(
    conn: &mut AsyncPgConnection,
    id: Uuid,
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
    .get_result(conn)
    .await
    .optional()?;
    if updated.is_some() {
        record_event(conn, id, Some(from), to, reason).await?;
    }
    Ok(updated)
}

/// Writes one `instance_events` row.
pub async fn record_event(
    conn: &mut AsyncPgConnection,
    instance_id: Uuid,
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
