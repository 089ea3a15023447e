//! `GET /stream/instances`: every instance event as it commits, as Server-Sent Events,
//! resumable with `Last-Event-ID` (the events come from `broker::stream`).

use std::convert::Infallible;
use std::time::Duration;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::openapi::TokenRefusals;
use super::wire::{
    ErrorBody, EventBody, InstanceBody, StreamClosedBody, StreamEventBody, StreamParams,
};
use super::AppState;
use crate::auth::Caller;
use crate::broker::stream::{Closed, Feed, Position, StreamEvent};

/// Frames a reader has not taken yet; past them the server waits for it.
const BUFFERED_FRAMES: usize = 16;

/// How long the server waits for a reader that takes nothing before it ends the stream.
const STALLED_AFTER: Duration = Duration::from_secs(30);

/// The header a reconnecting reader sends with the id of the last event it got.
const LAST_EVENT_ID: &str = "last-event-id";

/// Every instance event the caller may see, as it commits (Server-Sent Events).
///
/// Each event is an SSE event `instance` whose `data` is a `StreamEventBody` and whose
/// `id` is its position; a reader that reconnects with that id in `Last-Event-ID` gets
/// every later event once, in the same order, from any server. Comments (`: heartbeat`)
/// keep an idle stream open. When the server ends a stream (the reader fell too far
/// behind, the server stops) it first sends an event `closed` with the reason.
#[utoipa::path(
    get, path = "/stream/instances", tag = "instances",
    params(
        StreamParams,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event (empty: from now)"),
    ),
    responses(
        (status = 200, description = "An SSE stream of `instance` events (StreamEventBody) and, last, a `closed` event (StreamClosedBody)", content_type = "text/event-stream"),
        (status = 400, description = "A malformed query string", body = ErrorBody),
        (status = 404, description = "No such instance, or not the caller's", body = ErrorBody),
        (status = 422, description = "A bad filter or Last-Event-ID", body = ErrorBody),
        TokenRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn stream_instances(
    state: web::Data<AppState>,
    caller: Caller,
    query: web::Query<StreamParams>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let last_event_id = (req.headers().get(LAST_EVENT_ID))
        .filter(|value| !value.as_bytes().iter().all(u8::is_ascii_whitespace));
    let after = match last_event_id {
        None => None,
        Some(value) => Some(
            (value.to_str().ok())
                .and_then(|text| text.trim().parse::<Position>().ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "Last-Event-ID",
                        "Last-Event-ID must be the id of an event of this stream",
                    )
                })?,
        ),
    };
    let filter = (state.broker)
        .stream_filter(caller, query.into_inner().into())
        .await?;
    let feed = (state.stream.feed(caller, filter, after).await?)
        .ok_or_else(|| ApiError::Unavailable("the event stream is starting".to_owned()))?;
    let (frames, taken) = mpsc::channel(BUFFERED_FRAMES);
    tokio::spawn(pump(feed, frames, state.stream.heartbeat()));
    let body = futures_util::stream::unfold(taken, |mut taken| async move {
        let frame = taken.recv().await?;
        Some((Ok::<_, Infallible>(frame), taken))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

/// Writes the feed's events, heartbeats and, last, why it ended, until the reader goes
/// or stalls.
async fn pump(mut feed: Feed, frames: mpsc::Sender<Bytes>, heartbeat: Duration) {
    let mut beat = tokio::time::interval(heartbeat);
    beat.tick().await;
    // Tells a browser how soon to reconnect, and sends the headers at once.
    if !send(&frames, Bytes::from_static(b"retry: 1000\n\n")).await {
        return;
    }
    loop {
        let frame = tokio::select! {
            next = feed.next() => match next {
                Ok(event) => event_frame(&event),
                Err(closed) => {
                    send(&frames, closed_frame(closed)).await;
                    return;
                }
            },
            _ = beat.tick() => Bytes::from_static(b": heartbeat\n\n"),
        };
        if !send(&frames, frame).await {
            return;
        }
    }
}

/// Whether the reader took `frame` (within [`STALLED_AFTER`]).
async fn send(frames: &mpsc::Sender<Bytes>, frame: Bytes) -> bool {
    matches!(
        tokio::time::timeout(STALLED_AFTER, frames.send(frame)).await,
        Ok(Ok(()))
    )
}

/// An `instance` event.
fn event_frame(event: &StreamEvent) -> Bytes {
    let body = StreamEventBody {
        event: EventBody::from(event.event.clone()),
        instance: InstanceBody::from(event.instance.clone()),
    };
    frame(Some(event.position), "instance", &body)
}

/// The `closed` event.
fn closed_frame(closed: Closed) -> Bytes {
    let body = StreamClosedBody {
        reason: closed.reason().to_owned(),
    };
    frame(None, "closed", &body)
}

fn frame(id: Option<Position>, name: &str, body: &impl serde::Serialize) -> Bytes {
    // JSON without raw newlines is one `data` line.
    let data = serde_json::to_string(body).unwrap_or_else(|_| "{}".to_owned());
    let id = id.map(|id| format!("id: {id}\n")).unwrap_or_default();
    Bytes::from(format!("{id}event: {name}\ndata: {data}\n\n"))
}
