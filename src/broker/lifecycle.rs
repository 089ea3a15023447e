//! The instance lifecycle as pure rules: given a row, what the cloud says and the time,
//! each function returns a [`Decision`]; nothing here reads or writes the database.
//! [`super::state::apply`] writes a decision through the guarded transition.
//!
//! The shape is kube-rs's `reconcile → Action`: the decision is a value, so every
//! (state, cloud state) pair is covered by a table test with no database and no sleeps.

use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudbrain_provider::{CloudInstance, CloudState};

use super::model::Instance;
use super::state::State;
use crate::ids::TokenId;

/// What the cloud says of one machine, as it is written to its instance row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The cloud's id of the machine.
    pub upstream_id: String,
    /// Its address, once it has one.
    pub ip_address: Option<String>,
    /// What the provider says beyond the contract, by name (an ECS membership, say).
    pub details: Option<serde_json::Value>,
}

impl Seen {
    /// What `machine` says.
    pub fn of(machine: &CloudInstance) -> Self {
        Self {
            upstream_id: machine.upstream_id.clone(),
            ip_address: machine.ip_address.clone(),
            details: (!machine.details.is_empty())
                .then(|| serde_json::Value::Object(machine.details.clone().into_iter().collect())),
        }
    }

    /// True when this says something `row` does not yet.
    fn news_for(&self, row: &Instance) -> bool {
        row.upstream_id.as_deref() != Some(self.upstream_id.as_str())
            || (self.ip_address.is_some() && row.ip_address != self.ip_address)
            || (self.details.is_some() && row.details != self.details)
    }
}

/// What to do with one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write nothing.
    Keep,
    /// Write what the cloud says: `to` (the row's state or a later one) and the details.
    Record {
        /// The state the machine is in.
        to: State,
        /// Its id, address and details.
        seen: Seen,
    },
    /// Write what the cloud newly says of a machine whose row keeps its state (many of
    /// these are written by one statement: [`super::state::note_all`]).
    Note(Seen),
    /// The instance errored for `reason`; its machine, if any, is to be destroyed.
    Fail {
        /// Why, in words for the client.
        reason: String,
        /// What the cloud said of the machine, when it said anything.
        seen: Option<Seen>,
    },
    /// Leave the row; destroy the machine (it belongs to an errored instance).
    Destroy,
    /// The machine is gone: the instance is terminated.
    Terminate,
    /// Begin destroying the machine: `terminating`, and a remove job.
    BeginTermination {
        /// Who asked.
        reason: String,
    },
    /// The caller's key is on the warm machine it took.
    KeyAuthorized,
    /// The instance is terminated already: the request is for something gone.
    Gone,
    /// Nothing to write yet; look again later, for the reason given.
    NotYet(String),
}

impl Decision {
    /// True when the machine behind the row should be destroyed.
    pub fn destroys_machine(&self) -> bool {
        matches!(self, Decision::Fail { .. } | Decision::Destroy)
    }

    /// True when writing the decision changes a row.
    pub fn writes(&self) -> bool {
        !matches!(
            self,
            Decision::Keep | Decision::Destroy | Decision::Gone | Decision::NotYet(_)
        )
    }

    fn fail(reason: impl Into<String>, seen: Option<Seen>) -> Self {
        Decision::Fail {
            reason: reason.into(),
            seen,
        }
    }
}

/// The clock of one refresh: when its listing of the cloud began (database clock), now,
/// and how long a launch may take.
#[derive(Debug, Clone, Copy)]
pub struct RefreshClock {
    /// When the listing began; a row written after it is newer than the listing.
    pub listed_at: DateTime<Utc>,
    /// Now.
    pub now: DateTime<Utc>,
    /// How long an instance may take to reach `running`.
    pub launch_timeout: Duration,
}

/// The reason of the event that ends an instance whose lifetime is over.
pub const EXPIRED: &str = "expired";

/// What a refresh does with a live row and its machine as the listing showed it (`None`:
/// the listing had none).
///
/// A row that changed after the listing began is newer than the listing: a machine
/// recorded meanwhile may be missing from it, so its absence proves nothing, and the row
/// waits for the next refresh.
pub fn refresh(row: &Instance, machine: Option<&CloudInstance>, clock: &RefreshClock) -> Decision {
    let live = matches!(
        row.state,
        State::Creating | State::Starting | State::Running
    );
    if live && row.expires_at.is_some_and(|at| at <= clock.now) {
        return Decision::BeginTermination {
            reason: EXPIRED.to_owned(),
        };
    }
    if machine.is_none() && row.updated_at >= clock.listed_at {
        return Decision::Keep;
    }
    let recorded = match (row.state, machine) {
        // A machine on its way out may still say something new of itself (an ECS
        // container instance DRAINING, its tasks ending): that is kept, the state is not.
        (State::Terminating, Some(machine)) => {
            let seen = Seen::of(machine);
            if seen.details.is_some() && row.details != seen.details {
                return Decision::Note(seen);
            }
            return Decision::Keep;
        }
        (State::Terminating | State::Terminated, _) => return Decision::Keep,
        (State::Errored, Some(_)) => return Decision::Destroy,
        (State::Errored, None) => return Decision::Keep,
        (State::Starting | State::Running, None) => {
            return Decision::fail("the machine vanished from the cloud", None)
        }
        (State::Creating, None) => None,
        (_, Some(machine)) => match &machine.state {
            CloudState::Failed(reason) => return Decision::fail(reason.as_str(), None),
            CloudState::Terminating | CloudState::Terminated => {
                return Decision::fail("the machine was stopped outside cloudbrain", None)
            }
            CloudState::Starting | CloudState::Running => Some(Seen::of(machine)),
        },
    };
    let cloud_state = machine.map(|m| &m.state);
    // A warm machine taken with a key whose key job never got the key on it.
    if let (State::Running, Some(since)) = (row.state, row.key_pending_since) {
        let waited = clock.now.signed_duration_since(since).to_std();
        if waited.is_ok_and(|waited| waited > clock.launch_timeout) {
            let reason = format!(
                "the caller's key was not on the machine {} s after it was taken",
                clock.launch_timeout.as_secs()
            );
            return Decision::fail(reason, recorded);
        }
    }
    if !matches!(cloud_state, Some(CloudState::Running)) && launch_timed_out(row, clock) {
        let reason = format!(
            "the machine was not running {} s after it was asked for",
            clock.launch_timeout.as_secs()
        );
        return Decision::fail(reason, recorded);
    }
    match (recorded, cloud_state) {
        (Some(seen), Some(state)) => {
            let to = match (row.state, state) {
                (State::Creating, CloudState::Starting) => State::Starting,
                (State::Creating | State::Starting, CloudState::Running) => State::Running,
                (current, _) => current,
            };
            if to != row.state {
                Decision::Record { to, seen }
            } else if seen.news_for(row) {
                Decision::Note(seen)
            } else {
                Decision::Keep
            }
        }
        _ => Decision::Keep,
    }
}

fn launch_timed_out(row: &Instance, clock: &RefreshClock) -> bool {
    let launching = matches!(row.state, State::Creating | State::Starting);
    let age = clock.now.signed_duration_since(row.created_at);
    launching && age.to_std().is_ok_and(|age| age > clock.launch_timeout)
}

/// What the machine a create call returned does to its instance.
pub fn launched(machine: &CloudInstance) -> Decision {
    let seen = Seen::of(machine);
    match &machine.state {
        CloudState::Starting => Decision::Record {
            to: State::Starting,
            seen,
        },
        CloudState::Running => Decision::Record {
            to: State::Running,
            seen,
        },
        CloudState::Failed(reason) => Decision::fail(reason.as_str(), Some(seen)),
        CloudState::Terminating | CloudState::Terminated => {
            Decision::fail("the machine stopped as soon as it was made", Some(seen))
        }
    }
}

/// What a look at the machine after destroying it (`None`: the cloud has none) does to
/// its instance.
pub fn removed(machine: Option<&CloudState>) -> Decision {
    match machine {
        None | Some(CloudState::Terminated) => Decision::Terminate,
        Some(_) => Decision::NotYet("the machine is still shutting down".to_owned()),
    }
}

/// What `DELETE /instances/<id>` by token `token_id` does to an instance in `state`.
pub fn delete(state: State, token_id: TokenId) -> Decision {
    match state {
        State::Terminated => Decision::Gone,
        State::Terminating => Decision::Keep,
        _ => Decision::BeginTermination {
            reason: format!("deleted by token {token_id}"),
        },
    }
}

/// True when a create job still has a machine to make for an instance in `state`: one
/// deleted or errored before its machine was made has nothing left to do.
pub fn create_wanted(state: State) -> bool {
    state == State::Creating
}

/// True when a key job has a key to put on the machine of `row`.
pub fn key_wanted(row: &Instance) -> bool {
    row.state == State::Running && row.key_pending_since.is_some()
}

/// True when a remove job has a machine to destroy for an instance in `state`.
pub fn remove_wanted(state: State) -> bool {
    state == State::Terminating
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    const MINUTE: Duration = Duration::from_secs(60);

    fn at(minutes: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::minutes(minutes)
    }

    /// A row in `state`, asked for at minute 0 and last written at minute 1.
    fn row(state: State) -> Instance {
        Instance {
            id: crate::ids::InstanceId(Uuid::nil()),
            owner_token_id: Some(TokenId(1)),
            provider_name: "fake".into(),
            image: "ubuntu".into(),
            instance_type: "standard".into(),
            public_ssh_key: None,
            state,
            ip_address: None,
            upstream_id: None,
            error_reason: None,
            idempotency_key: None,
            created_at: at(0),
            updated_at: at(1),
            terminated_at: None,
            details: None,
            expires_at: None,
            pool_name: None,
            assigned_at: None,
            placement: None,
            asked: None,
            key_pending_since: None,
        }
    }

    fn machine(state: CloudState) -> CloudInstance {
        CloudInstance {
            id: Uuid::nil(),
            upstream_id: "i-1".into(),
            state,
            ip_address: Some("10.0.0.1".into()),
            launched_at: None,
            details: Default::default(),
        }
    }

    /// Listed at minute 2, now minute 3; launches may take `timeout` minutes.
    fn clock(timeout: u64) -> RefreshClock {
        RefreshClock {
            listed_at: at(2),
            now: at(3),
            launch_timeout: MINUTE * timeout as u32,
        }
    }

    fn record(to: State) -> Decision {
        Decision::Record {
            to,
            seen: Seen::of(&machine(CloudState::Running)),
        }
    }

    fn note() -> Decision {
        Decision::Note(Seen::of(&machine(CloudState::Running)))
    }

    fn fail(reason: &str, seen: bool) -> Decision {
        Decision::fail(
            reason,
            seen.then(|| Seen::of(&machine(CloudState::Running))),
        )
    }

    const STOPPED: &str = "the machine was stopped outside cloudbrain";
    const VANISHED: &str = "the machine vanished from the cloud";

    #[test]
    fn refresh_decides_every_state_and_cloud_state() {
        use CloudState as C;
        use Decision::{Destroy, Keep};
        use State as S;
        let failed = || C::Failed("disk full".into());
        // (row state, what the listing showed, the decision), launches well within time.
        let table: Vec<(S, Option<C>, Decision)> = vec![
            (S::Creating, None, Keep),
            (S::Creating, Some(C::Starting), record(S::Starting)),
            (S::Creating, Some(C::Running), record(S::Running)),
            (S::Creating, Some(C::Terminating), fail(STOPPED, false)),
            (S::Creating, Some(C::Terminated), fail(STOPPED, false)),
            (S::Creating, Some(failed()), fail("disk full", false)),
            (S::Starting, None, fail(VANISHED, false)),
            (S::Starting, Some(C::Starting), note()),
            (S::Starting, Some(C::Running), record(S::Running)),
            (S::Starting, Some(C::Terminating), fail(STOPPED, false)),
            (S::Starting, Some(C::Terminated), fail(STOPPED, false)),
            (S::Starting, Some(failed()), fail("disk full", false)),
            (S::Running, None, fail(VANISHED, false)),
            (S::Running, Some(C::Starting), note()),
            (S::Running, Some(C::Running), note()),
            (S::Running, Some(C::Terminating), fail(STOPPED, false)),
            (S::Running, Some(C::Terminated), fail(STOPPED, false)),
            (S::Running, Some(failed()), fail("disk full", false)),
            (S::Errored, None, Keep),
            (S::Errored, Some(C::Running), Destroy),
            (S::Errored, Some(C::Terminated), Destroy),
            (S::Terminating, None, Keep),
            (S::Terminating, Some(C::Running), Keep),
            (S::Terminating, Some(failed()), Keep),
            (S::Terminated, None, Keep),
            (S::Terminated, Some(C::Running), Keep),
        ];
        for (state, cloud, expected) in table {
            let machine = cloud.clone().map(machine);
            let decision = refresh(&row(state), machine.as_ref(), &clock(60));
            assert_eq!(decision, expected, "{state:?} with {cloud:?}");
        }
    }

    #[test]
    fn a_refresh_writes_nothing_when_the_row_already_says_it_all() {
        let mut running = row(State::Running);
        running.upstream_id = Some("i-1".into());
        running.ip_address = Some("10.0.0.1".into());
        let up = machine(CloudState::Running);
        assert_eq!(refresh(&running, Some(&up), &clock(60)), Decision::Keep);
        // A new address is news.
        running.ip_address = Some("10.0.0.2".into());
        assert_eq!(refresh(&running, Some(&up), &clock(60)), note());
        // A machine that has no address yet does not erase the row's.
        let mut quiet = up.clone();
        quiet.ip_address = None;
        running.ip_address = Some("10.0.0.1".into());
        assert_eq!(refresh(&running, Some(&quiet), &clock(60)), Decision::Keep);
    }

    #[test]
    fn a_row_written_after_the_listing_began_is_not_judged_by_its_absence() {
        let mut fresh = row(State::Running);
        fresh.updated_at = clock(60).listed_at;
        assert_eq!(refresh(&fresh, None, &clock(60)), Decision::Keep);
        // Seen in the listing, it is judged as usual.
        let gone = machine(CloudState::Terminated);
        assert_eq!(
            refresh(&fresh, Some(&gone), &clock(60)),
            fail(STOPPED, false)
        );
    }

    #[test]
    fn launches_that_outlive_the_timeout_fail_and_running_ones_never_do() {
        let timeout = "the machine was not running 60 s after it was asked for";
        // Asked for at minute 0, now minute 3: a one-minute timeout has passed.
        let late = clock(1);
        assert_eq!(
            refresh(&row(State::Creating), None, &late),
            fail(timeout, false)
        );
        let booting = machine(CloudState::Starting);
        assert_eq!(
            refresh(&row(State::Starting), Some(&booting), &late),
            fail(timeout, true),
            "what the cloud said is kept on the errored row"
        );
        let up = machine(CloudState::Running);
        assert_eq!(
            refresh(&row(State::Starting), Some(&up), &late),
            record(State::Running)
        );
        assert_eq!(refresh(&row(State::Running), Some(&up), &late), note());
        // Exactly at the timeout is not past it.
        let edge = RefreshClock {
            launch_timeout: MINUTE * 3,
            ..late
        };
        assert_eq!(refresh(&row(State::Creating), None, &edge), Decision::Keep);
    }

    #[test]
    fn a_live_instance_past_its_lifetime_is_ended_whatever_the_cloud_says() {
        use CloudState as C;
        use State as S;
        let expired = Decision::BeginTermination {
            reason: EXPIRED.to_owned(),
        };
        // Now is minute 3: expiring at minute 3 is expired, at minute 4 not yet.
        for state in [S::Creating, S::Starting, S::Running] {
            for cloud in [None, Some(C::Running), Some(C::Starting)] {
                let mut old = row(state);
                old.expires_at = Some(at(3));
                let machine = cloud.clone().map(machine);
                let decision = refresh(&old, machine.as_ref(), &clock(60));
                assert_eq!(decision, expired, "{state:?} with {cloud:?}");
                old.expires_at = Some(at(4));
                let decision = refresh(&old, machine.as_ref(), &clock(60));
                assert_ne!(decision, expired, "{state:?} with {cloud:?}");
            }
        }
        // A key that never got onto a warm machine taken with it errors the instance.
        let mut keyed = row(S::Running);
        keyed.upstream_id = Some("i-1".into());
        keyed.ip_address = Some("10.0.0.1".into());
        keyed.key_pending_since = Some(at(0));
        let running = machine(C::Running);
        assert_eq!(refresh(&keyed, Some(&running), &clock(60)), Decision::Keep);
        assert!(matches!(
            refresh(&keyed, Some(&running), &clock(1)),
            Decision::Fail { reason, .. } if reason.contains("key was not on the machine")
        ));
        // A machine on its way out keeps what it says of itself, and its state.
        let mut draining = machine(C::Running);
        draining
            .details
            .insert("ecs".into(), serde_json::json!({"status": "DRAINING"}));
        let leaving = refresh(&row(S::Terminating), Some(&draining), &clock(60));
        assert_eq!(leaving, Decision::Note(Seen::of(&draining)));
        let mut recorded = row(S::Terminating);
        recorded.details = Seen::of(&draining).details;
        assert_eq!(
            refresh(&recorded, Some(&draining), &clock(60)),
            Decision::Keep
        );
        // Rows on their way out, or out, are left to the rules of their state.
        for (state, cloud, then) in [
            (S::Terminating, Some(C::Running), Decision::Keep),
            (S::Terminated, None, Decision::Keep),
            (S::Errored, Some(C::Running), Decision::Destroy),
        ] {
            let mut old = row(state);
            old.expires_at = Some(at(0));
            let machine = cloud.map(machine);
            assert_eq!(refresh(&old, machine.as_ref(), &clock(60)), then);
        }
    }

    #[test]
    fn only_failures_and_errored_rows_destroy_machines() {
        assert!(fail("x", false).destroys_machine());
        assert!(Decision::Destroy.destroys_machine());
        for keep in [Decision::Keep, record(State::Running), Decision::Terminate] {
            assert!(!keep.destroys_machine(), "{keep:?}");
        }
    }

    #[test]
    fn a_create_result_records_the_machine_or_fails_the_instance() {
        assert_eq!(
            launched(&machine(CloudState::Starting)),
            Decision::Record {
                to: State::Starting,
                seen: Seen::of(&machine(CloudState::Running)),
            }
        );
        assert_eq!(
            launched(&machine(CloudState::Running)),
            record(State::Running)
        );
        assert_eq!(
            launched(&machine(CloudState::Failed("no such image".into()))),
            fail("no such image", true)
        );
        for stopped in [CloudState::Terminating, CloudState::Terminated] {
            assert_eq!(
                launched(&machine(stopped)),
                fail("the machine stopped as soon as it was made", true)
            );
        }
    }

    #[test]
    fn a_remove_ends_when_the_cloud_has_no_machine_or_a_terminated_one() {
        assert_eq!(removed(None), Decision::Terminate);
        assert_eq!(removed(Some(&CloudState::Terminated)), Decision::Terminate);
        for still in [
            CloudState::Running,
            CloudState::Starting,
            CloudState::Terminating,
        ] {
            assert!(
                matches!(removed(Some(&still)), Decision::NotYet(_)),
                "{still:?}"
            );
        }
    }

    #[test]
    fn delete_begins_termination_once_and_refuses_terminated_instances() {
        for state in [
            State::Creating,
            State::Starting,
            State::Running,
            State::Errored,
        ] {
            assert_eq!(
                delete(state, TokenId(7)),
                Decision::BeginTermination {
                    reason: "deleted by token 7".into()
                }
            );
        }
        assert_eq!(delete(State::Terminating, TokenId(7)), Decision::Keep);
        assert_eq!(delete(State::Terminated, TokenId(7)), Decision::Gone);
    }

    #[test]
    fn jobs_run_only_for_the_state_they_serve() {
        for &state in State::ALL {
            assert_eq!(create_wanted(state), state == State::Creating);
            assert_eq!(remove_wanted(state), state == State::Terminating);
        }
    }
}
