//! NOTIFY sent after commit, from one sender per process, coalesced.
//!
//! A transaction that sends NOTIFY takes a database-wide lock at commit and holds it until
//! its commit is on disk: every such transaction in the cluster commits one after
//! another, never in a group. So the writes that wake listeners (a new job, a new event)
//! send none themselves. Their callers hand the channels to an [`Announcer`] once the
//! write has committed; its one sender sends them in a transaction of its own, and
//! everything announced while it sends goes out together in the next one: a burst of a
//! thousand writes pays a few NOTIFYs, and its commits are never serialized by them.
//!
//! An announcement lost with its process (killed between commit and send) costs only
//! latency: every listener also polls.

use std::sync::{Arc, Mutex, OnceLock};

use diesel::sql_types::{Array, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::{CacheStatement, Pool};

/// Sends NOTIFY on channels after the writes that call for it have committed. Cloning
/// shares the sender.
#[derive(Clone)]
pub struct Announcer(Arc<Inner>);

struct Inner {
    pool: Pool,
    /// Channels announced since the sender last took them.
    pending: Mutex<Vec<&'static str>>,
    wake: tokio::sync::Notify,
    /// Set once the sender task runs (it starts on the first announcement, inside the
    /// runtime).
    sender: OnceLock<()>,
}

impl Announcer {
    /// An announcer that sends through `pool`.
    pub fn new(pool: Pool) -> Self {
        Self(Arc::new(Inner {
            pool,
            pending: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            sender: OnceLock::new(),
        }))
    }

    /// NOTIFY on each of `channels` soon. Call it only after the write it announces has
    /// committed: a listener woken earlier would not see it yet.
    pub fn announce(&self, channels: &[&'static str]) {
        if let Ok(mut pending) = self.0.pending.lock() {
            for channel in channels {
                if !pending.contains(channel) {
                    pending.push(channel);
                }
            }
        }
        self.0.sender.get_or_init(|| {
            tokio::spawn(send(self.0.clone()));
        });
        self.0.wake.notify_one();
    }
}

/// The sender: waits for announcements and sends all that are pending in one statement.
async fn send(inner: Arc<Inner>) {
    loop {
        inner.wake.notified().await;
        let channels = inner
            .pending
            .lock()
            .map(|mut pending| std::mem::take(&mut *pending))
            .unwrap_or_default();
        if channels.is_empty() {
            continue;
        }
        let sent = async {
            let mut conn = inner.pool.get().await.map_err(|e| e.to_string())?;
            send_now(&mut conn, &channels)
                .await
                .map_err(|e| e.to_string())
        };
        if let Err(error) = sent.await {
            // The listeners' polls find what this would have announced.
            tracing::warn!(%error, ?channels, "could not send NOTIFY; listeners will find the work by polling");
        }
    }
}

/// Sends NOTIFY on each of `channels` now, on `conn` (outside a transaction, it is its
/// own): for a one-off command with no [`Announcer`], after its write committed.
pub async fn send_now(
    conn: &mut AsyncPgConnection,
    channels: &[&'static str],
) -> diesel::QueryResult<()> {
    diesel::sql_query("SELECT pg_notify(channel, '') FROM unnest($1) AS channel")
        .bind::<Array<Text>, _>(channels)
        .cached()
        .execute(conn)
        .await
        .map(drop)
}
