//! `GET /stream/instances`: live events, who sees what, resuming with `Last-Event-ID`
//! (also on another server), events that commit out of order, readers that fall behind.

use std::collections::HashSet;
use std::time::Duration;

use cloudbrain::auth::Scope;
use diesel_async::AsyncPgConnection;
use serde_json::json;

use crate::common::{exchange, exec, wait_for, Sse, TestApp, TestBroker, STREAM_HEARTBEAT};

/// How long a reader waits to be sure nothing more comes.
const QUIET: Duration = Duration::from_millis(1000);

/// How long events that are due may take: the stream holds every event back while any
/// older write transaction on the cluster runs (other tests' too).
const DUE: Duration = Duration::from_secs(20);

/// The events' (instance, state) pairs.
fn changes(events: &[Sse]) -> Vec<(String, String)> {
    (events.iter())
        .map(|e| (e.instance().to_owned(), e.to_state().to_owned()))
        .collect()
}

/// The events' `reason`s.
fn reasons(events: &[Sse]) -> Vec<String> {
    (events.iter())
        .map(|e| {
            e.data["event"]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// Writes an event of `instance` entering `running` because of `reason`.
async fn write_event(conn: &mut AsyncPgConnection, instance: &str, reason: &str) {
    let sql = format!(
        "INSERT INTO instance_events (instance_id, from_state, to_state, reason) \
         VALUES ('{instance}', 'creating', 'running', '{reason}')"
    );
    exec(conn, &sql).await;
}

#[tokio::test]
async fn a_client_watches_its_instance_start_and_sees_nobody_elses() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    let me = s.client();
    let other = s.client_with(Scope::Client).await;
    let admin = s.client_with(Scope::Admin).await;
    let mut mine = me.stream("", None).await.unwrap();
    let mut running = me
        .stream("state=running&provider=fake", None)
        .await
        .unwrap();
    let mut theirs = other.stream("", None).await.unwrap();
    let mut everyone = admin.stream("", None).await.unwrap();

    let id = s.create("ubuntu").await;
    s.settle(&id, "running").await;

    let timeline: Vec<(String, String)> = (s.states(&id).await.into_iter())
        .map(|state| (id.clone(), state))
        .collect();
    let seen = mine.take(timeline.len(), DUE).await;
    assert_eq!(changes(&seen), timeline);
    assert_eq!(mine.drain(QUIET).await, []);
    assert_eq!(
        changes(&seen).last().unwrap(),
        &(id.clone(), "running".to_owned())
    );
    let last = seen.last().unwrap();
    assert_eq!(last.data["instance"]["state"], "running", "{last:?}");
    assert!(last.data["instance"]["ip_address"].is_string(), "{last:?}");
    assert!(mine.heartbeats >= 2, "{} heartbeats", mine.heartbeats);

    assert_eq!(
        changes(&running.take(1, DUE).await),
        [(id.clone(), "running".into())]
    );
    assert_eq!(changes(&everyone.take(timeline.len(), DUE).await), timeline);
    assert_eq!(running.drain(QUIET).await, []);
    assert_eq!(theirs.drain(QUIET).await, []);
    assert!(theirs.heartbeats >= 2, "an idle stream stays open");
    assert!(STREAM_HEARTBEAT < QUIET);
}

#[tokio::test]
async fn reconnecting_with_last_event_id_replays_what_was_missed_once_on_any_server() {
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    let other_server = TestApp::spawn(&s.db).await;
    let me = s.client();
    let mut first = me.stream("", None).await.unwrap();
    let a = s.create("ubuntu").await;
    let b = s.create("ubuntu").await;
    let got = first.take(1, DUE).await.remove(0);
    assert_eq!(got.instance(), a);
    drop(first);
    let c = s.create("ubuntu").await;
    let d = s.create("ubuntu").await;

    let resumed = other_server.client(&me.token);
    let mut again = resumed.stream("", got.id.as_deref()).await.unwrap();
    let missed = again.take(3, DUE).await;
    assert_eq!(again.drain(QUIET).await, []);
    let ids: Vec<&str> = missed.iter().map(Sse::instance).collect();
    assert_eq!(ids, [&b, &c, &d]);

    // The same, filtered to one instance, from the start of this one's events.
    let mut only_c = me
        .stream(&format!("instance={c}"), got.id.as_deref())
        .await
        .unwrap();
    assert_eq!(
        changes(&only_c.take(1, DUE).await),
        [(c.clone(), "creating".into())]
    );
    assert_eq!(only_c.drain(QUIET).await, []);
}

#[tokio::test]
async fn an_event_that_commits_late_is_not_passed_over() {
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    let (x, y) = (s.create("ubuntu").await, s.create("ubuntu").await);
    let mut reader = s.client().stream("state=running", None).await.unwrap();

    // The first transaction takes its ids first and commits last.
    let mut early = s.db.conn().await;
    exec(&mut early, "BEGIN").await;
    write_event(&mut early, &x, "written first, committed last").await;
    let mut late = s.db.conn().await;
    write_event(&mut late, &y, "written last, committed first").await;
    assert_eq!(
        reader.next(QUIET).await,
        None,
        "nothing passes the open transaction"
    );

    exec(&mut early, "COMMIT").await;
    let seen = reader.take(2, DUE).await;
    assert_eq!(
        reasons(&seen),
        [
            "written first, committed last",
            "written last, committed first"
        ]
    );
    let mut resumed = (s.client())
        .stream("state=running", seen[0].id.as_deref())
        .await
        .unwrap();
    assert_eq!(
        reasons(&resumed.take(1, DUE).await),
        ["written last, committed first"]
    );
    assert_eq!(resumed.drain(QUIET).await, []);
}

#[tokio::test]
async fn concurrent_writers_and_resuming_readers_see_every_event_once_in_one_order() {
    const WRITERS: usize = 8;
    const EACH: usize = 25;
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    let other_server = TestApp::spawn(&s.db).await;
    let mut instances = Vec::new();
    for _ in 0..4 {
        instances.push(s.create("ubuntu").await);
    }
    let me = s.client();
    // The writers' events enter `running`; the instances' first ones, `creating`.
    let mut steady = me.stream("state=running", None).await.unwrap();
    // From the start of the stream: the four instances' first events.
    let mut from_start = me.stream("", Some("0-0")).await.unwrap();
    let before = from_start.take(4, DUE).await;
    let start = before.last().and_then(|e| e.id.clone());

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (url, instance) = (s.db.url.clone(), instances[w % 4].clone());
            tokio::spawn(async move {
                use diesel_async::AsyncConnection;
                let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
                for i in 0..EACH {
                    // Each transaction holds its ids a while before it commits, so commits
                    // interleave out of id order.
                    exec(&mut conn, "BEGIN").await;
                    write_event(&mut conn, &instance, &format!("w{w}-{i:02}")).await;
                    let hold = (w * 7 + i * 13) % 17;
                    tokio::time::sleep(Duration::from_millis(hold as u64)).await;
                    exec(&mut conn, "COMMIT").await;
                }
            })
        })
        .collect();

    // A reader that drops its stream every few events and resumes, on either server.
    let token = me.token.clone();
    let servers = [&s.app, &other_server];
    let mut hopping: Vec<Sse> = Vec::new();
    let mut last = start.clone();
    let mut round = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while hopping.len() < WRITERS * EACH && tokio::time::Instant::now() < deadline {
        let client = servers[round % 2].client(&token);
        let mut reader = client
            .stream("state=running", last.as_deref())
            .await
            .unwrap();
        for _ in 0..(3 + round % 5) {
            let Some(event) = reader.next(Duration::from_millis(300)).await else {
                break;
            };
            last = event.id.clone();
            hopping.push(event);
        }
        round += 1;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let steady_seen = steady.take(WRITERS * EACH, DUE).await;
    assert_eq!(steady.drain(QUIET).await, []);

    let expected: HashSet<String> = (0..WRITERS)
        .flat_map(|w| (0..EACH).map(move |i| format!("w{w}-{i:02}")))
        .collect();
    for (who, seen) in [("steady", &steady_seen), ("hopping", &hopping)] {
        let got = reasons(seen);
        assert_eq!(got.len(), WRITERS * EACH, "{who} saw {} events", got.len());
        assert_eq!(
            got.iter().cloned().collect::<HashSet<_>>(),
            expected,
            "{who}"
        );
        // One order: each writer's own events in the order it committed them.
        for w in 0..WRITERS {
            let prefix = format!("w{w}-");
            let own: Vec<&String> = got.iter().filter(|r| r.starts_with(&prefix)).collect();
            let mut sorted = own.clone();
            sorted.sort();
            assert_eq!(own, sorted, "{who}: writer {w}'s events out of order");
        }
    }
    assert_eq!(
        reasons(&steady_seen),
        reasons(&hopping),
        "both readers saw one order"
    );
    assert!(round > 10, "the hopping reader connected {round} times");
}

#[tokio::test]
async fn a_reader_that_falls_too_far_behind_is_closed_with_a_reason_and_resumes_where_it_was() {
    const BURST: usize = 20_000;
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    let x = s.create("ubuntu").await;
    let mut slow = s.client().stream("state=running", None).await.unwrap();
    let mut conn = s.db.conn().await;
    let sql = format!(
        "INSERT INTO instance_events (instance_id, from_state, to_state, reason) \
         SELECT '{x}', 'creating', 'running', 'burst ' || lpad(n::text, 5, '0') \
         FROM generate_series(1, {BURST}) n"
    );
    exec(&mut conn, &sql).await;
    // The reader takes nothing while the server hands out the burst.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut seen = Vec::new();
    while let Some(event) = slow.next(QUIET).await {
        seen.push(event);
    }
    let closed = seen.pop().unwrap();
    assert_eq!(closed.event, "closed", "{closed:?}");
    let reason = closed.data["reason"].as_str().unwrap();
    assert!(reason.contains("fell too far behind"), "{reason}");
    assert!(slow.ended, "the server ended the stream");
    assert!(
        seen.len() < BURST,
        "{} of {BURST} before it was closed",
        seen.len()
    );

    let mut resumed = (s.client())
        .stream("state=running", seen.last().and_then(|e| e.id.as_deref()))
        .await
        .unwrap();
    let rest = BURST - seen.len();
    seen.extend(resumed.take(rest, DUE).await);
    assert_eq!(resumed.drain(QUIET).await, []);
    let expected: Vec<String> = (1..=BURST).map(|n| format!("burst {n:05}")).collect();
    let got = reasons(&seen);
    assert_eq!(got.len(), BURST, "no event lost or repeated");
    assert!(got == expected, "the burst arrived out of order");
}

#[tokio::test]
async fn bad_filters_and_positions_are_refused_with_the_field_at_fault() {
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    let other = s.client_with(Scope::Client).await;
    let theirs = other
        .post(
            "/instances",
            &json!({"provider": "fake", "image": "ubuntu"}),
        )
        .await;
    let theirs = theirs.expect(200)["id"].as_str().unwrap().to_owned();
    let stream = |query: &str| s.app.get(&format!("/stream/instances{query}"), &s.token);
    let mut seen = String::new();
    for query in [
        "?state=bogus",
        "?pool=no/such",
        "?provider=",
        "?instance=not-an-id",
    ] {
        seen += &exchange(&format!("GET /stream/instances{query}"), stream(query)).await;
    }
    seen += &exchange(
        "GET /stream/instances?instance=<another token's instance>",
        stream(&format!("?instance={theirs}")),
    )
    .await;
    for id in ["nope", "1-", "12-x", "-3"] {
        seen += &exchange(
            &format!("GET /stream/instances (Last-Event-ID: {id})"),
            stream("").header("Last-Event-ID", id),
        )
        .await;
    }
    let anonymous = s.app.client.get(s.app.url("/stream/instances"));
    seen += &exchange("GET /stream/instances (no token)", anonymous).await;
    insta::assert_snapshot!(seen);
}

#[tokio::test]
async fn a_reader_from_now_gets_what_commits_after_it_connects_and_nothing_before() {
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    // Nobody reads while these commit: the server only moves its head past them.
    let before = s.create("ubuntu").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut reader = s.client().stream("", None).await.unwrap();
    let after = s.create("ubuntu").await;
    let seen = reader.take(1, DUE).await;
    assert_eq!(changes(&seen), [(after, "creating".to_owned())]);
    assert_eq!(reader.drain(QUIET).await, [], "nothing of {before}");
}

#[tokio::test]
async fn a_server_listens_for_events_only_while_someone_reads_the_stream() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    // No reader: writes' NOTIFYs wake no session of the server's.
    let id = s.create("ubuntu").await;
    s.settle(&id, "running").await;
    assert_eq!(s.db.listening("instance_events").await, 0);

    let mut reader = s.client().stream("", None).await.unwrap();
    wait_for("the server to listen", Duration::from_secs(5), async || {
        s.db.listening("instance_events").await == 1
    })
    .await;
    let id = s.create("ubuntu").await;
    s.settle(&id, "running").await;
    let timeline: Vec<(String, String)> = (s.states(&id).await.into_iter())
        .map(|state| (id.clone(), state))
        .collect();
    assert_eq!(changes(&reader.take(timeline.len(), DUE).await), timeline);

    drop(reader);
    wait_for(
        "the server to stop listening",
        Duration::from_secs(10),
        async || s.db.listening("instance_events").await == 0,
    )
    .await;
}
