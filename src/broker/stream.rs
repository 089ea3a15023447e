//! The instance event stream: every event in one order that never changes once read, a
//! process's [`Hub`] that tails it and fans it out, and each reader's [`Feed`].
//!
//! Events are read in `(tx, id)` order, where `tx` is the writing transaction's id, and
//! only those of transactions older than the oldest one still running
//! (`pg_snapshot_xmin`). Every transaction below that line has ended, so no event can
//! commit later behind one already read: a reader that resumes after a [`Position`] gets
//! every later event once, wherever it reads (each http process tails the same table).

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Int8};
use diesel_async::RunQueryDsl;
use tokio::sync::{broadcast, watch, Notify};

use super::instances::{state_named, visible};
use super::model::{Instance, InstanceEvent};
use super::validate::{PoolName, ProviderName};
use super::{Broker, BrokerError, State};
use crate::auth::Caller;
use crate::db::listen::ListenWhile;
use crate::db::schema::{instance_events, instances};
use crate::db::CacheStatement;
use crate::ids::InstanceId;

/// The channel a trigger on `instance_events` notifies when events commit.
pub const EVENTS_CHANNEL: &str = "instance_events";

/// Events read at once, by the hub and by a feed catching up.
const PAGE: i64 = 500;

/// How often the hub reads without being woken: an event may become readable when a
/// transaction that wrote none ends.
const TAIL_POLL: Duration = Duration::from_millis(500);

/// Events the hub holds for readers; a reader further behind is closed.
const HUB_CAPACITY: usize = 4096;

/// How long a new reader waits for a hub that is starting.
const READY_WAIT: Duration = Duration::from_secs(5);

/// The oldest transaction still running: events of older ones are final.
macro_rules! fence {
    () => {
        "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
    };
}

/// A [`Position`] as text; empty: none (as browsers treat an empty `Last-Event-ID`).
pub const POSITION_PATTERN: &str = "^([0-9]{1,18}-[0-9]{1,18})?$";

/// Where an event stands in the stream; the SSE id, `<tx>-<id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// The writing transaction's id.
    pub tx: i64,
    /// The event's row id.
    pub id: i64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.tx, self.id)
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let number = |part: &str| {
            (!part.is_empty() && part.len() <= 18 && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<i64>().ok())
                .flatten()
        };
        s.split_once('-')
            .and_then(|(tx, id)| {
                Some(Position {
                    tx: number(tx)?,
                    id: number(id)?,
                })
            })
            .ok_or_else(|| {
                "must be the id of an event of this stream, `<number>-<number>`".to_owned()
            })
    }
}

/// An event with its place in the stream and its instance as it is now.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    /// Where it stands.
    pub position: Position,
    /// The change.
    pub event: InstanceEvent,
    /// The instance, as read with the event.
    pub instance: Instance,
}

/// Which events a reader wants; every field that is set must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamFilter {
    /// The instance's provider config.
    pub provider: Option<String>,
    /// The instance's pool.
    pub pool: Option<String>,
    /// The state the event entered.
    pub state: Option<State>,
    /// The instance.
    pub instance: Option<InstanceId>,
}

impl StreamFilter {
    /// Whether `caller` sees `event` through this filter: only its own instances' events,
    /// unless an admin.
    pub fn admits(&self, caller: Caller, event: &StreamEvent) -> bool {
        let instance = &event.instance;
        visible(caller, instance)
            && self
                .provider
                .as_ref()
                .is_none_or(|p| *p == instance.provider_name)
            && (self.pool.as_ref()).is_none_or(|p| Some(p) == instance.pool_name.as_ref())
            && self.state.is_none_or(|s| s == event.event.to_state)
            && self.instance.is_none_or(|id| id == instance.id)
    }
}

/// A reader's filter as it asks for it, unchecked.
#[derive(Debug, Clone, Default)]
pub struct StreamQuery {
    /// `provider`.
    pub provider: Option<String>,
    /// `pool`.
    pub pool: Option<String>,
    /// `state`.
    pub state: Option<String>,
    /// `instance`.
    pub instance: Option<String>,
}

impl Broker {
    /// The filter `query` asks for, checked field by field; an instance the caller cannot
    /// see is not found, as everywhere.
    pub async fn stream_filter(
        &self,
        caller: Caller,
        query: StreamQuery,
    ) -> Result<StreamFilter, BrokerError> {
        let instance = match query.instance.as_deref() {
            None => None,
            Some(text) => {
                let id = InstanceId::parse(text).ok_or(BrokerError::NotFound)?;
                Some(self.get_instance(caller, id).await?.id)
            }
        };
        Ok(StreamFilter {
            provider: (query.provider.as_deref())
                .map(|p| ProviderName::parse(p).map(|p| p.as_str().to_owned()))
                .transpose()?,
            pool: (query.pool.as_deref())
                .map(|p| PoolName::parse_as("pool", p).map(|p| p.as_str().to_owned()))
                .transpose()?,
            state: query.state.as_deref().map(state_named).transpose()?,
            instance,
        })
    }

    /// Up to `limit` final events after `after`, in stream order.
    pub async fn events_after(
        &self,
        after: Position,
        limit: i64,
    ) -> Result<Vec<StreamEvent>, BrokerError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(i64, InstanceEvent, Instance)> = instance_events::table
            .inner_join(instances::table)
            .filter(sql::<Bool>(concat!("instance_events.tx < ", fence!())))
            .filter(
                sql::<Bool>("(instance_events.tx, instance_events.id) > (")
                    .bind::<Int8, _>(after.tx)
                    .sql(", ")
                    .bind::<Int8, _>(after.id)
                    .sql(")"),
            )
            .order((instance_events::tx, instance_events::id))
            .limit(limit)
            .select((
                instance_events::tx,
                InstanceEvent::as_select(),
                Instance::as_select(),
            ))
            .cached()
            .load(&mut conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(tx, event, instance)| StreamEvent {
                position: Position { tx, id: event.id },
                event,
                instance,
            })
            .collect())
    }

    /// The position of the newest final event (the start, when there is none).
    pub async fn stream_head(&self) -> Result<Position, BrokerError> {
        /// The head as [`Hub::tail`] reads it every [`TAIL_POLL`] with no reader, and as
        /// each reader from now reads it: a statement with no parameters (a bound `LIMIT`
        /// would be planned anew on every run), so Postgres plans it once per connection.
        #[derive(QueryableByName)]
        struct Head {
            #[diesel(sql_type = Int8)]
            tx: i64,
            #[diesel(sql_type = Int8)]
            id: i64,
        }
        let mut conn = self.conn().await?;
        let head: Option<Head> = diesel::sql_query(concat!(
            "SELECT tx, id FROM instance_events WHERE tx < ",
            fence!(),
            " ORDER BY tx DESC, id DESC LIMIT 1"
        ))
        .cached()
        .get_result(&mut conn)
        .await
        .optional()?;
        Ok(head.map_or_else(Position::default, |Head { tx, id }| Position { tx, id }))
    }
}

/// One process's tail of the stream: while it has readers it listens, reads new events
/// when woken by the trigger's NOTIFY (or every [`TAIL_POLL`]) and hands them to every
/// [`Feed`], holding at most [`HUB_CAPACITY`] of them whatever the readers do. With none it
/// does not listen (a NOTIFY costs it nothing): it moves its head only every
/// [`TAIL_POLL`], and a new reader reads where the stream ends for itself.
pub struct Hub {
    broker: Broker,
    heartbeat: Duration,
    /// Told of a NOTIFY heard while there are readers, and of each new reader.
    wake: Arc<Notify>,
    sender: broadcast::Sender<Arc<StreamEvent>>,
    /// The last event handed out; `None` until the tail has read where the stream ends.
    head: Mutex<Option<Position>>,
    /// Whether `head` is known.
    ready: watch::Sender<bool>,
    closing: watch::Sender<bool>,
}

/// Why a feed ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// It fell more than the hub holds behind.
    FellBehind,
    /// The server is stopping.
    ShuttingDown,
    /// The database could not be read.
    Unavailable,
}

impl Closed {
    /// What a reader is told.
    pub fn reason(self) -> &'static str {
        match self {
            Closed::FellBehind => {
                "the stream fell too far behind; reconnect with Last-Event-ID to resume"
            }
            Closed::ShuttingDown => {
                "the server is shutting down; reconnect with Last-Event-ID to resume"
            }
            Closed::Unavailable => {
                "the database is unavailable; reconnect with Last-Event-ID to resume"
            }
        }
    }
}

impl Hub {
    /// A hub reading through `broker`, its readers told every `heartbeat` that the stream
    /// is alive; it hands out nothing until [`Hub::run`] runs.
    pub fn new(broker: Broker, heartbeat: Duration) -> Arc<Self> {
        let (sender, _) = broadcast::channel(HUB_CAPACITY);
        Arc::new(Self {
            broker,
            heartbeat,
            sender,
            head: Mutex::new(None),
            ready: watch::Sender::new(false),
            closing: watch::Sender::new(false),
            wake: Arc::new(Notify::new()),
        })
    }

    /// Tails the stream until the process ends, woken by NOTIFY on `database_url` while
    /// it has readers, and listening only then ([`ListenWhile`]). A new reader wakes the
    /// loop, which starts listening and reads anything it could have missed.
    pub async fn run(self: Arc<Self>, database_url: String) {
        let mut listening = ListenWhile::new(database_url, EVENTS_CHANNEL, self.wake.clone());
        loop {
            if let Err(error) = self.tail().await {
                tracing::warn!(%error, "reading the event stream failed; retrying");
            }
            listening.set(self.sender.receiver_count() > 0);
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(TAIL_POLL) => {}
            }
        }
    }

    /// Hands out every final event after the last one handed out.
    ///
    /// With no reader it only moves its head to where the stream ends (one index read),
    /// checked under the lock readers subscribe under, so that no event after the head
    /// handed to a reader is skipped.
    async fn tail(&self) -> Result<(), BrokerError> {
        let known = self.head.lock().map(|h| *h).unwrap_or_default();
        let Some(mut head) = known else {
            let head = self.broker.stream_head().await?;
            if let Ok(mut slot) = self.head.lock() {
                *slot = Some(head);
            }
            self.ready.send_replace(true);
            return Ok(());
        };
        if self.sender.receiver_count() == 0 {
            let end = self.broker.stream_head().await?;
            if let Ok(mut slot) = self.head.lock() {
                if self.sender.receiver_count() == 0 {
                    *slot = Some(end.max(head));
                    return Ok(());
                }
            }
        }
        loop {
            let page = self.broker.events_after(head, PAGE).await?;
            let full = page.len() as i64 == PAGE;
            for event in page {
                head = event.position;
                if let Ok(mut slot) = self.head.lock() {
                    // Nobody listening is not an error.
                    let _ = self.sender.send(Arc::new(event));
                    *slot = Some(head);
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// How often an idle reader is told the stream is alive.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// Ends every feed (the server is stopping).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// A feed for `caller` of the events `filter` admits after `after`, or from now (where
    /// the stream ends as read after subscribing: the hub's head lags while it has no
    /// reader); `Ok(None)` when the hub has not learnt where the stream ends within
    /// [`READY_WAIT`].
    pub async fn feed(
        &self,
        caller: Caller,
        filter: StreamFilter,
        after: Option<Position>,
    ) -> Result<Option<Feed>, BrokerError> {
        let mut ready = self.ready.subscribe();
        let waited = tokio::time::timeout(READY_WAIT, ready.wait_for(|ready| *ready)).await;
        if !matches!(waited, Ok(Ok(_))) {
            return Ok(None);
        }
        // Subscribed under the lock the tail moves the head under.
        let subscribed =
            (self.head.lock().ok()).and_then(|slot| Some((self.sender.subscribe(), (*slot)?)));
        let Some((receiver, head)) = subscribed else {
            return Ok(None);
        };
        // The hub hands out events from its head on; those up to the cursor are passed.
        self.wake.notify_one();
        let cursor = match after {
            Some(after) => after,
            None => self.broker.stream_head().await?.max(head),
        };
        Ok(Some(Feed {
            broker: self.broker.clone(),
            caller,
            filter,
            cursor,
            caught_up: after.is_none(),
            backlog: VecDeque::new(),
            receiver,
            closing: self.closing.subscribe(),
        }))
    }
}

/// One reader's events: first those it missed, read from the table, then the hub's; each
/// once, in stream order.
pub struct Feed {
    broker: Broker,
    caller: Caller,
    filter: StreamFilter,
    /// The last event passed (delivered or filtered out).
    cursor: Position,
    caught_up: bool,
    backlog: VecDeque<Arc<StreamEvent>>,
    receiver: broadcast::Receiver<Arc<StreamEvent>>,
    closing: watch::Receiver<bool>,
}

impl Feed {
    /// The next event for this reader, or why it ends. Cancel-safe: an event is passed
    /// only when returned.
    pub async fn next(&mut self) -> Result<Arc<StreamEvent>, Closed> {
        loop {
            if *self.closing.borrow() {
                return Err(Closed::ShuttingDown);
            }
            if let Some(event) = self.backlog.pop_front() {
                if event.position <= self.cursor {
                    continue;
                }
                self.cursor = event.position;
                if self.filter.admits(self.caller, &event) {
                    return Ok(event);
                }
                continue;
            }
            if !self.caught_up {
                let page = (self.broker.events_after(self.cursor, PAGE).await)
                    .map_err(|_unreadable| Closed::Unavailable)?;
                self.caught_up = (page.len() as i64) < PAGE;
                self.backlog.extend(page.into_iter().map(Arc::new));
                continue;
            }
            tokio::select! {
                _ = self.closing.changed() => return Err(Closed::ShuttingDown),
                received = self.receiver.recv() => match received {
                    Ok(event) => self.backlog.push_back(event),
                    Err(broadcast::error::RecvError::Lagged(_)) => return Err(Closed::FellBehind),
                    Err(broadcast::error::RecvError::Closed) => return Err(Closed::ShuttingDown),
                },
            }
        }
    }
}

/// Aborts a task when dropped.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_back_what_it_writes_and_nothing_else() {
        let p = Position { tx: 7512, id: 42 };
        assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1",
            "a-1",
            "1-b",
            "+1-2",
            "1--2",
            "1-2-3",
            " 1-2",
            "1234567890123456789-1",
        ] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?} was read");
        }
    }

    #[test]
    fn positions_order_by_transaction_first() {
        let early_tx_late_row = Position { tx: 10, id: 900 };
        let late_tx_early_row = Position { tx: 11, id: 5 };
        assert!(early_tx_late_row < late_tx_early_row);
    }
}
