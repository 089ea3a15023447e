//! A database outage, as clients live it: requests in flight when Postgres stops answer
//! 503 with Retry-After (never 500), and the server recovers without a restart.

use std::time::{Duration, Instant};

use crate::common::{key, TestApp};
use cloudbrain::auth::{store, Scope};
use cloudbrain::broker::providers::insert_provider;
use cloudbrain::dev::ThrowawayPostgres;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use serde_json::json;

#[tokio::test]
async fn requests_in_flight_when_postgres_stops_get_503_and_the_server_recovers() {
    // A cluster of its own, since this test stops it.
    let pg = tokio::task::spawn_blocking(ThrowawayPostgres::start)
        .await
        .unwrap()
        .unwrap();
    cloudbrain::db::run_migrations(&pg.url).await.unwrap();
    let mut setup = AsyncPgConnection::establish(&pg.url).await.unwrap();
    insert_provider(&mut setup, &key(), "fake", "fake", &json!(null))
        .await
        .unwrap();
    let token = store::create_token(&mut setup, "outage", Scope::Client)
        .await
        .unwrap()
        .to_string();
    drop(setup);
    let app = TestApp::spawn_on(&pg.url).await;
    let existing = app.create(&token, "ubuntu").await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Hold a lock every instances query waits on, so the requests are in flight, inside
    // and outside transactions, when the server goes.
    let mut holder = AsyncPgConnection::establish(&pg.url).await.unwrap();
    holder
        .batch_execute("BEGIN; LOCK TABLE instances IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut in_flight = Vec::new();
    for i in 0..4 {
        let requests = [
            app.get("/instances", &token),
            app.get(&format!("/instances/{existing}"), &token),
            app.get(&format!("/instances/{existing}/events"), &token),
            app.post("/instances", &token)
                .json(&json!({"provider": "fake", "image": format!("img-{i}")})),
            app.delete(&format!("/instances/{existing}"), &token),
        ];
        for request in requests {
            in_flight.push(tokio::spawn(request.send()));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = tokio::task::spawn_blocking(move || {
        pg.stop("fast").unwrap();
        pg
    });

    // Each is refused as unavailable, unless its backend got the lock and committed in
    // the moment between the holder's end and its own (the server stops its backends one
    // after another): then it is answered, and what it wrote must outlive the outage.
    let (mut refused, mut acknowledged) = (0, Vec::new());
    for request in in_flight {
        let response = request.await.unwrap().unwrap();
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").cloned();
        let body: serde_json::Value = response.json().await.unwrap();
        if status == 200 {
            let posted = body["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("img-"));
            if let Some(id) = body["id"].as_str().filter(|_| posted) {
                acknowledged.push(id.to_owned());
            }
            continue;
        }
        assert_eq!(status, 503, "{body}");
        assert!(retry_after.is_some(), "503 without Retry-After");
        assert_eq!(body["code"], "unavailable", "{body}");
        refused += 1;
    }
    assert!(
        refused >= 16,
        "only {refused} of 20 requests in flight were refused"
    );
    let pg = stopping.await.unwrap();
    drop(holder);

    // While it is down, new requests are 503 as well.
    let down = app.get("/instances", &token).send().await.unwrap();
    assert_eq!(down.status(), 503);
    assert_eq!(app.anonymous_status("/readyz").await, 503);

    // Back up: the same server answers again, without a restart.
    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again().unwrap();
        pg
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = app.get("/instances", &token).send().await.unwrap();
        if response.status() == 200 {
            break;
        }
        assert_eq!(response.status(), 503, "while reconnecting");
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let created = app
        .post("/instances", &token)
        .json(&json!({"provider": "fake", "image": "after"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    for id in &acknowledged {
        let answer = app
            .get(&format!("/instances/{id}"), &token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            answer.status(),
            200,
            "instance {id}, acknowledged, was lost"
        );
    }
    drop(app);
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}
