//! LISTEN/NOTIFY: a connection of its own that hears a channel, reconnecting when it drops.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::AsyncMessage;

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
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) =
        tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    let result = async {
        client.batch_execute(&format!("LISTEN {channel}")).await?;
        on_heard(Heard::Connected);
        let mut heartbeat = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                payload = rx.recv() => match payload {
                    Some(payload) => on_heard(Heard::Payload(payload)),
                    None => return Ok(()),
                },
                _ = heartbeat.tick() => {
                    // A connection that died silently would otherwise go unnoticed.
                    match tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1")).await {
                        Ok(answer) => { answer?; }
                        Err(_) => return Ok(()),
                    }
                }
            }
        }
    }
    .await;
    driver.abort();
    result
}
