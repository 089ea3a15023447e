//! LISTEN/NOTIFY: a connection of its own that hears a channel, reconnecting when it drops.

use std::sync::Arc;
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;

/// What a listener tells its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// Listening (again): notifications sent while disconnected were missed.
    Connected,
    /// The connection dropped; nothing is heard until the next `Connected`.
    Disconnected,
    /// A notification's payload.
    Payload(String),
}

/// A session that listens on one channel only while its owner has something to hear:
/// Postgres wakes every listening session of a database for each notification, whatever
/// its channel, so a session kept for nothing costs every NOTIFY of the database. While
/// on, each notification on the channel wakes `wake`, and so does each (re)connection
/// (what was sent while it was not listening was missed: the owner reads it then).
/// Stopped when dropped.
pub struct ListenWhile {
    database_url: String,
    channel: &'static str,
    wake: Arc<tokio::sync::Notify>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ListenWhile {
    /// Not listening yet: see [`ListenWhile::set`].
    pub fn new(
        database_url: String,
        channel: &'static str,
        wake: Arc<tokio::sync::Notify>,
    ) -> Self {
        Self {
            database_url,
            channel,
            wake,
            task: None,
        }
    }

    /// Listens from now on when `on` (if it did not already), else stops.
    pub fn set(&mut self, on: bool) {
        match (on, self.task.take()) {
            (true, None) => {
                let wake = self.wake.clone();
                let heard = move |heard| {
                    if heard != Heard::Disconnected {
                        wake.notify_one();
                    }
                };
                let listening = listen_forever(self.database_url.clone(), self.channel, heard);
                self.task = Some(tokio::spawn(listening));
            }
            (true, task) => self.task = task,
            (false, task) => {
                if let Some(task) = task {
                    task.abort();
                }
            }
        }
    }
}

impl Drop for ListenWhile {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Listens on `channel` until the process ends, passing what it hears to `on_heard`.
pub async fn listen_forever(
    database_url: String,
    channel: &'static str,
    mut on_heard: impl FnMut(Heard),
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match listen_once(&database_url, channel, &mut on_heard).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(error) => {
                tracing::warn!(%error, channel, "listener on {channel} disconnected; retrying")
            }
        }
        on_heard(Heard::Disconnected);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn listen_once(
    database_url: &str,
    channel: &str,
    on_heard: &mut impl FnMut(Heard),
) -> anyhow::Result<()> {
    let mut conn = AsyncPgConnection::establish(database_url).await?;
    diesel::sql_query(format!("LISTEN {channel}"))
        .execute(&mut conn)
        .await?;
    on_heard(Heard::Connected);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(10));
    heartbeat.tick().await;
    loop {
        let heard = {
            let mut notifications = std::pin::pin!(conn.notifications_stream());
            tokio::select! {
                heard = notifications.next() => Some(heard),
                _ = heartbeat.tick() => None,
            }
        };
        match heard {
            Some(Some(notification)) => on_heard(Heard::Payload(notification?.payload)),
            Some(None) => return Ok(()),
            None => {
                // A connection that died silently would otherwise go unnoticed.
                let ping = diesel::sql_query("SELECT 1").execute(&mut conn);
                match tokio::time::timeout(Duration::from_secs(5), ping).await {
                    Ok(answer) => {
                        answer?;
                    }
                    Err(_) => return Ok(()),
                }
            }
        }
    }
}
