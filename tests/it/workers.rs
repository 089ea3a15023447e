//! The queue and the workers against a real Postgres and the fake cloud: every job outcome
//! and every refresh case, as a user of the API would see them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{exec, fast_settings, text, wait_for, Jobs, TestBroker, Workers};
use async_trait::async_trait;
use cloudbrain::config::WorkerSettings;
use cloudbrain_provider::{
    CallLimits, CloudInstance, CloudState, InstanceSpec, Provider, ProviderError,
};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn an_instance_goes_from_creating_to_running_to_terminated() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    let id = s.create("ubuntu").await;
    assert_eq!(s.workers.run_pending_jobs().await, 1);
    let running = s.body(&id).await;
    assert_eq!(running["state"], "running");
    assert!(running["upstream_id"]
        .as_str()
        .unwrap()
        .starts_with("fake-"));
    assert!(running["ip_address"]
        .as_str()
        .unwrap()
        .starts_with("192.0.2."));
    assert_eq!(s.machines().await, 1);

    s.delete(&id).await.expect(200);
    assert_eq!(s.workers.run_pending_jobs().await, 1);
    assert_eq!(s.status(&id).await, 410);
    assert_eq!(s.machines().await, 0);
    assert_eq!(
        s.states(&id).await,
        ["creating", "running", "terminating", "terminated"]
    );
    assert!(s.row(&id).await.terminated_at.is_some());
    assert_eq!(s.db.count_jobs(Jobs::All).await, 0);
}

#[tokio::test]
async fn the_refresh_moves_a_booting_machine_to_running_and_then_writes_nothing() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 2000}))
        .start()
        .await;
    let id = s.create("ubuntu").await;
    s.workers.run_pending_jobs().await;
    assert_eq!(s.body(&id).await["state"], "starting");
    s.workers.refresh.refresh_all().await;
    assert_eq!(s.body(&id).await["state"], "starting");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    s.workers.refresh.refresh_all().await;
    assert_eq!(s.body(&id).await["state"], "running");

    let mut conn = s.db.conn().await;
    let snapshot = "SELECT string_agg(xmin::text || updated_at::text, ',') AS v FROM instances";
    let before = text(&mut conn, snapshot).await;
    let events = s.db.count_events().await;
    for _ in 0..3 {
        let reports = s.workers.refresh.refresh_all().await;
        assert_eq!(reports[0].1.machines, 1);
    }
    assert_eq!(
        text(&mut conn, snapshot).await,
        before,
        "a refresh of an unchanged fleet wrote"
    );
    assert_eq!(s.db.count_events().await, events);
}

#[tokio::test]
async fn a_refresh_writes_exactly_the_rows_whose_machines_changed() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    // More rows than one write batch holds.
    let mut ids = Vec::new();
    for i in 0..300 {
        ids.push(s.create(&format!("image-{i}")).await);
    }
    s.workers.run_pending_jobs().await;
    s.workers.refresh.refresh_all().await;
    let mut conn = s.db.conn().await;
    let snapshot =
        "SELECT string_agg(id::text || ':' || xmin::text, ',' ORDER BY id) AS v FROM instances";
    let versions = |text: Option<String>| -> std::collections::HashMap<String, String> {
        text.unwrap()
            .split(',')
            .map(|pair| {
                let (id, xmin) = pair.split_once(':').unwrap();
                (id.to_owned(), xmin.to_owned())
            })
            .collect()
    };
    let before = versions(text(&mut conn, snapshot).await);
    let events = s.db.count_events().await;

    // Three machines (1 %), on either side of the batch boundary, get new addresses.
    let changed = [&ids[0], &ids[150], &ids[299]];
    for (n, id) in changed.iter().enumerate() {
        exec(
            &mut conn,
            &format!("UPDATE fake_cloud.machines SET ip_address = '192.0.2.{n}' WHERE instance_id = '{id}'"),
        )
        .await;
    }
    let reports = s.workers.refresh.refresh_all().await;
    assert_eq!(reports[0].1.machines, 300);
    assert_eq!(reports[0].1.written, 3);
    let after = versions(text(&mut conn, snapshot).await);
    let written: Vec<&String> = ids.iter().filter(|id| before[*id] != after[*id]).collect();
    assert_eq!(written, changed, "rows written other than the changed ones");
    for (n, id) in changed.iter().enumerate() {
        let body = s.body(id).await;
        assert_eq!(body["ip_address"], format!("192.0.2.{n}"));
        assert_eq!(body["state"], "running");
    }
    // A new address is no change of state: no event.
    assert_eq!(s.db.count_events().await, events);
    assert_eq!(s.workers.refresh.refresh_all().await[0].1.written, 0);
}

#[tokio::test]
async fn a_late_refresh_never_moves_a_deleted_instance_back() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    let id = s.create("ubuntu").await;
    s.workers.run_pending_jobs().await;
    s.delete(&id).await.expect(200);
    // The machine still runs (the remove job has not run): the cloud says "running".
    s.workers.refresh.refresh_all().await;
    assert_eq!(s.body(&id).await["state"], "terminating");
    s.workers.run_pending_jobs().await;
    s.workers.refresh.refresh_all().await;
    assert_eq!(
        s.states(&id).await,
        ["creating", "running", "terminating", "terminated"]
    );
}

#[tokio::test]
async fn a_vanished_machine_errors_its_instance() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    let id = s.create("ubuntu").await;
    s.workers.run_pending_jobs().await;
    exec(&mut s.db.conn().await, "DELETE FROM fake_cloud.machines").await;
    s.workers.refresh.refresh_all().await;
    s.assert_errored(&id, "vanished").await;
    // Deleting an errored instance still ends in terminated.
    s.delete(&id).await.expect(200);
    s.workers.run_pending_jobs().await;
    assert_eq!(s.status(&id).await, 410);
}

#[tokio::test]
async fn a_stuck_launch_is_errored_and_its_machine_destroyed() {
    let settings = WorkerSettings {
        launch_timeout: Duration::from_millis(200),
        ..fast_settings()
    };
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 3_600_000}))
        .settings(settings)
        .start()
        .await;
    // One never got a worker; one got a machine that never boots.
    let never_made = s.create("ubuntu").await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    s.workers.refresh.refresh_all().await;
    s.assert_errored(&never_made, "not running").await;
    assert_eq!(
        s.job(&never_made).await.0,
        None,
        "its create job should be gone"
    );

    let never_booted = s.create("ubuntu").await;
    s.workers.run_pending_jobs().await;
    assert_eq!(s.body(&never_booted).await["state"], "starting");
    assert_eq!(s.machines().await, 1);
    tokio::time::sleep(Duration::from_millis(250)).await;
    s.workers.refresh.refresh_all().await;
    assert_eq!(s.body(&never_booted).await["state"], "errored");
    assert_eq!(s.machines().await, 0, "the stuck machine leaked");
}

#[tokio::test]
async fn orphans_are_destroyed_after_the_grace_period_only() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    let ours = s.create("ubuntu").await;
    s.workers.run_pending_jobs().await;
    let shared = || cloudbrain_provider_fake::FakeConfig {
        store_url: Some(cloudbrain_provider::Secret::new(s.db.url.clone())),
        ..Default::default()
    };
    let fake = cloudbrain_provider_fake::FakeCloud::new("fake", shared());
    let spec = InstanceSpec {
        image: "x".into(),
        instance_type: "standard".into(),
        public_ssh_key: None,
        placement: None,
    };
    fake.create(Uuid::new_v4(), &spec).await.unwrap();
    // Another provider config's machines are not ours to judge.
    let other = cloudbrain_provider_fake::FakeCloud::new("someone-else", shared());
    other.create(Uuid::new_v4(), &spec).await.unwrap();
    assert_eq!(s.machines().await, 3);

    let patient = Workers::new(
        &s.db.url,
        WorkerSettings {
            orphan_grace: Duration::from_secs(3600),
            ..fast_settings()
        },
    );
    patient.refresh.refresh_all().await;
    assert_eq!(
        s.machines().await,
        3,
        "an orphan was destroyed inside its grace period"
    );

    let reports = s.workers.refresh.refresh_all().await;
    assert_eq!(reports[0].1.destroyed_orphans, 1);
    assert_eq!(s.machines().await, 2);
    assert_eq!(s.body(&ours).await["state"], "running");
}

#[tokio::test]
async fn an_invalid_request_errors_the_instance_at_once() {
    let s = TestBroker::new()
        .fake(json!({"invalid_images": ["no-such-image"]}))
        .start()
        .await;
    s.db.ends_with_jobs(&["create dead"]);
    let id = s.create("no-such-image").await;
    s.workers.run_pending_jobs().await;
    s.assert_errored(&id, "no-such-image").await;
    let (status, _, attempts) = s.job(&id).await;
    assert_eq!((status.as_deref(), attempts), (Some("dead"), 1));
}

#[tokio::test]
async fn transient_errors_retry_with_backoff_until_the_last_attempt() {
    let s = TestBroker::new()
        .fake(json!({"transient_error_rate": 1.0}))
        .start()
        .await;
    s.db.ends_with_jobs(&["create dead"]);
    let id = s.create("ubuntu").await;
    for _ in 0..100 {
        s.workers.run_pending_jobs().await;
        if s.body(&id).await["state"] == "errored" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let instance = s.body(&id).await;
    assert_eq!(instance["state"], "errored");
    let reason = instance["error_reason"].as_str().unwrap();
    assert!(
        reason.contains("gave up after 3 attempts") && reason.contains("internal error"),
        "{reason}"
    );
    let (status, error, attempts) = s.job(&id).await;
    assert_eq!((status.as_deref(), attempts), (Some("dead"), 3));
    assert!(error.unwrap().contains("internal error"));
    assert_eq!(s.machines().await, 0);
}

#[tokio::test]
async fn throttling_waits_as_long_as_the_cloud_asks() {
    let s = TestBroker::new()
        .fake(json!({"throttle_rate": 1.0, "throttle_retry_after_ms": 30000}))
        .start()
        .await;
    s.db.ends_with_jobs(&["create queued"]);
    let id = s.create("ubuntu").await;
    assert_eq!(
        s.workers.run_pending_jobs().await,
        1,
        "the retry must not be runnable yet"
    );
    let wait = s.db.job_due_in(&id).await;
    assert!((25..=34).contains(&wait), "rescheduled {wait} s ahead");
    assert_eq!(s.body(&id).await["state"], "creating");
    assert!(s.job(&id).await.1.unwrap().contains("throttled"));
}

#[tokio::test]
async fn capacity_errors_are_retried_not_fatal() {
    let s = TestBroker::new()
        .fake(json!({"capacity_error_rate": 1.0}))
        .settings(WorkerSettings {
            backoff_base: Duration::from_secs(60),
            ..fast_settings()
        })
        .start()
        .await;
    s.db.ends_with_jobs(&["create queued"]);
    let id = s.create("ubuntu").await;
    s.workers.run_pending_jobs().await;
    let (status, error, attempts) = s.job(&id).await;
    assert_eq!((status.as_deref(), attempts), (Some("queued"), 1));
    assert!(error.unwrap().contains("capacity"));
    assert_eq!(s.body(&id).await["state"], "creating");
}

type CreateFn =
    Box<dyn Fn(Uuid) -> BoxFuture<'static, Result<CloudInstance, ProviderError>> + Send + Sync>;

/// A provider whose create does what the test says; it lists nothing and destroys nothing.
struct Stub(CreateFn);

#[async_trait]
impl Provider for Stub {
    async fn create(&self, id: Uuid, _spec: &InstanceSpec) -> Result<CloudInstance, ProviderError> {
        (self.0)(id).await
    }
    async fn get(&self, _id: Uuid) -> Result<CloudInstance, ProviderError> {
        Err(ProviderError::NotFound)
    }
    async fn list(&self) -> Result<Vec<CloudInstance>, ProviderError> {
        Ok(Vec::new())
    }
    async fn destroy(&self, _id: Uuid) -> Result<(), ProviderError> {
        Ok(())
    }
}

fn running(id: Uuid) -> CloudInstance {
    CloudInstance {
        id,
        upstream_id: format!("u-{id}"),
        state: CloudState::Running,
        ip_address: None,
        launched_at: None,
        details: Default::default(),
    }
}

#[tokio::test]
async fn a_panic_in_a_job_is_a_failure_not_a_dead_worker() {
    let s = TestBroker::new()
        .fake(json!(null))
        .settings(WorkerSettings {
            backoff_base: Duration::from_secs(3600),
            backoff_max: Duration::from_secs(3600),
            ..fast_settings()
        })
        .start()
        .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let panics_once = Stub(Box::new(move |id| {
        let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                panic!("provider bug");
            }
            Ok(running(id))
        }
        .boxed()
    }));
    s.workers
        .registry
        .insert("fake", Arc::new(panics_once), CallLimits::default());
    let id = s.create("ubuntu").await;
    s.workers.run_pending_jobs().await;
    let (status, error, _) = s.job(&id).await;
    assert_eq!(status.as_deref(), Some("queued"));
    assert!(error.unwrap().contains("job panicked: provider bug"));
    s.make_jobs_due().await;
    s.workers.run_pending_jobs().await;
    assert_eq!(s.body(&id).await["state"], "running");
}

#[tokio::test]
async fn a_burst_of_requests_never_becomes_a_burst_against_the_cloud() {
    let s = TestBroker::new().fake(json!(null)).start().await;
    // Counts how many creates run at once.
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, p) = (now.clone(), peak.clone());
    let gauge = Stub(Box::new(move |id| {
        let (now, peak) = (n.clone(), p.clone());
        async move {
            peak.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            Ok(running(id))
        }
        .boxed()
    }));
    s.workers.registry.insert(
        "fake",
        Arc::new(gauge),
        CallLimits {
            max_concurrency: 2,
            rate_limit: 1000.0,
        },
    );
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(s.create("ubuntu").await);
    }
    s.workers.run_pending_jobs().await;
    for id in &ids {
        assert_eq!(s.body(id).await["state"], "running");
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        2,
        "16 worker slots, 2 allowed against the cloud"
    );
}

#[tokio::test]
async fn a_refresh_skips_a_provider_another_refresh_worker_holds() {
    let s = TestBroker::new().fake(json!(null)).start().await;
    let holder = cloudbrain::db::locks::Session::new(s.db.url.clone());
    assert!(holder.try_lock_refresh("fake").await.unwrap());
    let reports = s.workers.refresh.refresh_all().await;
    assert!(reports[0].1.skipped, "{reports:?}");
    assert!(holder.unlock_refresh("fake").await.unwrap());
    let reports = s.workers.refresh.refresh_all().await;
    assert!(!reports[0].1.skipped);
}

#[tokio::test]
async fn delete_while_the_create_call_runs_leaves_no_machine() {
    let s = TestBroker::new()
        .fake(json!({"create_latency_ms": 400, "boot_time_ms": 0}))
        .start()
        .await;
    let id = s.create("ubuntu").await;
    let jobs = s.workers.jobs.clone();
    let creating = tokio::spawn(async move { jobs.run_until_idle().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(s.machines().await, 1, "the create call should be in flight");
    s.delete(&id).await.expect(200);
    creating.await.unwrap();
    for _ in 0..50 {
        s.workers.run_pending_jobs().await;
        if s.status(&id).await == 410 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.status(&id).await, 410);
    assert_eq!(s.machines().await, 0);
}

#[tokio::test]
async fn metrics_report_instances_jobs_provider_calls_and_auth() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0, "invalid_images": ["bad"]}))
        .start()
        .await;
    s.db.ends_with_jobs(&["create dead"]);
    s.create("ubuntu").await;
    s.create("bad").await;
    let text = s
        .app
        .client
        .get(s.app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("cloudbrain_instances{provider=\"fake\",state=\"creating\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("cloudbrain_jobs_queued{kind=\"create\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("cloudbrain_auth_scrypt_runs_total 1"),
        "{text}"
    );
    assert!(text.contains("cloudbrain_auth_cache_hits_total"), "{text}");
    s.workers.run_pending_jobs().await;
    let gauges = s.workers.broker.gauges().await.unwrap();
    let text = s.workers.metrics.render(&gauges, None);
    assert!(
        text.contains("cloudbrain_instances{provider=\"fake\",state=\"running\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("cloudbrain_jobs_dead{kind=\"create\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("cloudbrain_dispatch_latency_seconds_count 2"),
        "{text}"
    );
    assert!(text.contains("cloudbrain_provider_call_duration_seconds_count{provider=\"fake\",operation=\"create\"} 2"), "{text}");
}

#[tokio::test]
async fn a_worker_that_lost_its_lease_cannot_finish_requeue_or_bury_the_job() {
    use cloudbrain::queue::JobKind;
    let s = TestBroker::new().fake(json!(null)).start().await;
    let id = s.create("ubuntu").await;
    let queue = s.queue(2);
    let kinds = [JobKind::CreateInstance];
    let stale = queue
        .claim(
            "worker-a",
            &kinds,
            1,
            Duration::from_millis(1),
            Duration::ZERO,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let held = queue
        .claim(
            "worker-b",
            &kinds,
            1,
            Duration::from_secs(60),
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert_eq!(
        held[0].job_id, stale[0].job_id,
        "the lapsed lease is claimed again"
    );
    let stale = &stale[0];

    assert!(!queue.finish(stale).await.unwrap());
    assert!(!queue
        .retry_later(stale, Duration::ZERO, "late retry")
        .await
        .unwrap());
    assert!(!s.workers.broker.bury(stale, "late give-up").await.unwrap());
    assert!(!queue.release(stale, Duration::ZERO).await.unwrap());
    assert!(!queue.renew(stale, Duration::from_secs(60)).await.unwrap());

    // The job is still worker B's, untouched, and its instance was not errored.
    let jobs = s.jobs(&id).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let job = &jobs[0];
    assert_eq!(job.kind, "create");
    assert_eq!(job.locked_by.as_deref(), Some("worker-b"));
    assert_eq!(job.status, "queued");
    assert_eq!(job.last_error, None);
    assert_eq!(job.attempts, 2);
    assert_eq!(s.body(&id).await["state"], "creating");
    // Worker B, which holds it, can.
    assert!(queue.finish(&held[0]).await.unwrap());
    assert!(s.jobs(&id).await.is_empty());
}

#[tokio::test]
async fn a_finished_create_is_recorded_with_or_without_the_lease_and_ends_only_a_held_job() {
    use cloudbrain::broker::lifecycle::{Decision, Seen};
    use cloudbrain::broker::State;
    use cloudbrain::queue::JobKind;
    let s = TestBroker::new().fake(json!(null)).start().await;
    let queue = s.queue(2);
    let kinds = [JobKind::CreateInstance];
    let claim = async |worker: &str, lease: Duration| {
        let mut leases = queue
            .claim(worker, &kinds, 1, lease, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(leases.len(), 1, "{worker} claimed {leases:?}");
        leases.remove(0)
    };
    let made = |upstream: &str| Decision::Record {
        to: State::Running,
        seen: Seen {
            upstream_id: upstream.to_owned(),
            ip_address: Some("192.0.2.7".to_owned()),
            details: None,
        },
    };
    let finish = async |lease: &cloudbrain::queue::Lease, upstream: &str| {
        s.workers
            .broker
            .finish_with(lease, &made(upstream))
            .await
            .unwrap();
    };

    // Held: the instance runs, its event is written, the job is gone.
    let held_id = s.create("ubuntu").await;
    let held = claim("worker-a", Duration::from_secs(60)).await;
    finish(&held, "m-held").await;
    let body = s.body(&held_id).await;
    assert_eq!(body["state"], "running");
    assert_eq!(body["ip_address"], "192.0.2.7");
    assert!(s.jobs(&held_id).await.is_empty());
    assert_eq!(
        s.moves(&held_id).await,
        [
            (json!(null), json!("creating")),
            (json!("creating"), json!("running"))
        ]
    );

    // Lost to another worker: what the cloud said is recorded, the job stays that worker's.
    let lost_id = s.create("ubuntu").await;
    let stale = claim("worker-a", Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let taken = claim("worker-b", Duration::from_secs(60)).await;
    finish(&stale, "m-lost").await;
    let body = s.body(&lost_id).await;
    assert_eq!(
        (&body["state"], &body["upstream_id"]),
        (&json!("running"), &json!("m-lost"))
    );
    let jobs = s.jobs(&lost_id).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].locked_by.as_deref(), Some("worker-b"));
    assert!(queue.finish(&taken).await.unwrap());

    // Deleted while its machine was being made: the row stays terminating, learns the
    // machine (so its remove job can destroy it), and the create job ends.
    let moved_id = s.create("ubuntu").await;
    let lease = claim("worker-c", Duration::from_secs(60)).await;
    assert_eq!(
        s.client()
            .delete(&format!("/instances/{moved_id}"))
            .await
            .status,
        200
    );
    finish(&lease, "m-moved").await;
    let body = s.body(&moved_id).await;
    assert_eq!(body["state"], "terminating");
    assert_eq!(body["upstream_id"], "m-moved");
    let kinds_left: Vec<String> = s
        .jobs(&moved_id)
        .await
        .into_iter()
        .map(|j| j.kind)
        .collect();
    assert_eq!(kinds_left, ["remove"]);
    s.workers.run_pending_jobs().await;
    assert_eq!(s.body(&moved_id).await["state"], "terminated");
}

/// A claim of up to `limit` jobs of `kinds` by "worker-a", leased for a minute.
fn claim_by_worker_a(
    kinds: &[cloudbrain::queue::JobKind],
    limit: usize,
) -> cloudbrain::queue::Claim<'_> {
    cloudbrain::queue::Claim {
        worker: "worker-a",
        kinds,
        limit,
        lease: Duration::from_secs(60),
        waited: Duration::ZERO,
    }
}

#[tokio::test]
async fn a_claims_jobs_start_from_one_read_of_their_rows_and_a_row_changed_since_leaks_nothing() {
    use cloudbrain::broker::{ClaimedRows, State};
    use cloudbrain::queue::{Handler, JobKind, Outcome};
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    let queue = s.queue(2);
    let kept = s.create("ubuntu").await;
    let deleted = s.create("ubuntu").await;
    let unread = s.create("ubuntu").await;
    let kinds = [JobKind::CreateInstance];
    let claim = claim_by_worker_a(&kinds, 2);
    let (mut leases, claimed) = s.workers.jobs.handler().claim(&claim).await.unwrap();
    assert_eq!(leases.len(), 2, "{leases:?}");
    for lease in &leases {
        let row = claimed.instance(lease.instance_id).map(|i| i.state);
        assert_eq!(row, Some(State::Creating), "{lease:?}");
    }
    assert!(
        claimed.placing().is_some(),
        "a claim with a create reads placing"
    );
    let rest = queue
        .claim(
            "worker-a",
            &kinds,
            1,
            Duration::from_secs(60),
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert!(claimed.instance(rest[0].instance_id).is_none());
    leases.extend(rest);

    // Deleted after its claim read it creating, before its job ran: the job makes the
    // machine, the row stays terminating and learns it, and its remove job destroys it.
    assert_eq!(s.delete(&deleted).await.status, 200);
    for lease in leases.drain(..2) {
        assert_eq!(s.workers.jobs.run_job(lease, &claimed).await, Outcome::Done);
    }
    // A job whose claim read nothing for it (the read failed) reads its own row.
    let lease = leases.remove(0);
    let none = ClaimedRows::default();
    assert_eq!(s.workers.jobs.run_job(lease, &none).await, Outcome::Done);
    for id in [&kept, &unread] {
        assert_eq!(s.body(id).await["state"], "running", "{id}");
    }
    let body = s.body(&deleted).await;
    assert_eq!(body["state"], "terminating", "{body}");
    assert!(body["upstream_id"].is_string(), "{body}");
    assert_eq!(s.machines().await, 3);
    s.workers.run_pending_jobs().await;
    assert_eq!(s.body(&deleted).await["state"], "terminated");
    assert_eq!(
        s.machines().await,
        2,
        "the deleted instance's machine is gone"
    );
}

#[tokio::test]
async fn claims_take_the_oldest_jobs_first_and_never_the_same_job_twice() {
    use cloudbrain::queue::JobKind;
    let s = TestBroker::new().fake(json!(null)).start().await;
    let mut conn = s.db.conn().await;
    // Statistics taken while the queue was empty, then 300 jobs, oldest first by run_at.
    exec(&mut conn, "ANALYZE jobs").await;
    exec(
        &mut conn,
        "INSERT INTO instances (id, owner_token_id, provider_name, image, instance_type, state) \
         SELECT gen_random_uuid(), (SELECT min(id) FROM auth_tokens), 'fake', 'ubuntu', \
                'standard', 'creating' FROM generate_series(1, 300); \
         INSERT INTO jobs (kind, instance_id, run_at) \
         SELECT 'create', id, now() - (row_number() OVER (ORDER BY id)) * interval '1 second' \
         FROM instances",
    )
    .await;
    let oldest: Vec<String> = text(
        &mut conn,
        "SELECT string_agg(id::text, ',' ORDER BY run_at, id) AS v FROM \
         (SELECT id, run_at FROM jobs ORDER BY run_at, id LIMIT 16) AS o",
    )
    .await
    .unwrap()
    .split(',')
    .map(str::to_owned)
    .collect();
    let queue = s.queue(4);
    let kinds = [JobKind::CreateInstance];
    let lease = Duration::from_secs(60);
    let first = queue
        .claim("worker-a", &kinds, 16, lease, Duration::ZERO)
        .await
        .unwrap();
    let mut first_ids: Vec<String> = first.iter().map(|l| l.job_id.to_string()).collect();
    first_ids.sort_by_key(|id| oldest.iter().position(|o| o == id));
    assert_eq!(
        first_ids, oldest,
        "the first claim took other than the 16 oldest"
    );

    // Two workers claiming the rest at once share it without overlap.
    let claim_all = |worker: &'static str| {
        let queue = queue.clone();
        async move {
            let mut taken = Vec::new();
            loop {
                let leases = queue
                    .claim(worker, &kinds, 7, lease, Duration::ZERO)
                    .await
                    .unwrap();
                if leases.is_empty() {
                    return taken;
                }
                taken.extend(leases.into_iter().map(|l| l.job_id.to_string()));
            }
        }
    };
    let (a, b) = tokio::join!(claim_all("worker-a"), claim_all("worker-b"));
    let mut all: Vec<String> = first_ids.into_iter().chain(a).chain(b).collect();
    let claimed = all.len();
    all.sort();
    all.dedup();
    assert_eq!(claimed, 300, "claims took {claimed} leases of 300 jobs");
    assert_eq!(all.len(), 300, "a job was claimed twice");
    // Leased, not run: the harness's check that no job is left over does not apply.
    exec(&mut conn, "DELETE FROM jobs").await;
}

#[tokio::test]
async fn a_claim_made_while_jobs_are_enqueued_returns_each_job_it_leases_with_its_instance() {
    use cloudbrain::queue::{Handler, JobKind};
    let s = TestBroker::new().fake(json!(null)).start().await;
    let kinds = [JobKind::CreateInstance];
    let claim = claim_by_worker_a(&kinds, 8);
    // Each job commits with its instance while claims run, some of them in the moment
    // between a claim's start and its taking of the rows.
    const JOBS: usize = 400;
    let enqueued = std::sync::atomic::AtomicBool::new(false);
    let enqueue = async {
        let mut conn = s.db.conn().await;
        for _ in 0..JOBS {
            exec(
                &mut conn,
                "WITH i AS (INSERT INTO instances (id, owner_token_id, provider_name, image, \
                 instance_type, state) SELECT gen_random_uuid(), min(id), 'fake', 'ubuntu', \
                 'standard', 'creating' FROM auth_tokens RETURNING id) \
                 INSERT INTO jobs (kind, instance_id) SELECT 'create', id FROM i",
            )
            .await;
        }
        enqueued.store(true, Ordering::SeqCst);
    };
    let claim_all = async {
        let mut taken = Vec::new();
        loop {
            let done = enqueued.load(Ordering::SeqCst);
            let (leases, claimed) = s.workers.jobs.handler().claim(&claim).await.unwrap();
            for lease in &leases {
                let row = claimed.instance(lease.instance_id).map(|i| i.id);
                assert_eq!(row, Some(lease.instance_id), "{lease:?}");
            }
            let empty = leases.is_empty();
            taken.extend(leases.into_iter().map(|l| l.job_id.to_string()));
            // Every job was in before a claim that found none: none is left.
            if done && empty {
                return taken;
            }
            if empty {
                tokio::task::yield_now().await;
            }
        }
    };
    let ((), taken) = tokio::join!(enqueue, claim_all);
    assert_eq!(
        taken.len(),
        JOBS,
        "claims returned {} of {JOBS} jobs",
        taken.len()
    );
    let mut conn = s.db.conn().await;
    assert_eq!(
        s.db.count_jobs(Jobs::Leased).await,
        JOBS as i64,
        "a job was leased that no claim returned"
    );
    // Leased, not run: the harness's check that no job is left over does not apply.
    exec(&mut conn, "DELETE FROM jobs").await;
}

/// The fake cloud, whose first listing waits, once listed, until the test says go: what
/// happens between a refresh's listing and its read of the rows is up to the test.
struct PausedListing {
    inner: cloudbrain_provider_fake::FakeCloud,
    paused: std::sync::atomic::AtomicBool,
    listed: Arc<tokio::sync::Notify>,
    go: Arc<tokio::sync::Notify>,
}

#[async_trait]
impl Provider for PausedListing {
    async fn create(&self, id: Uuid, spec: &InstanceSpec) -> Result<CloudInstance, ProviderError> {
        self.inner.create(id, spec).await
    }
    async fn get(&self, id: Uuid) -> Result<CloudInstance, ProviderError> {
        self.inner.get(id).await
    }
    async fn list(&self) -> Result<Vec<CloudInstance>, ProviderError> {
        let listing = self.inner.list().await;
        if !self.paused.swap(true, Ordering::SeqCst) {
            self.listed.notify_one();
            self.go.notified().await;
        }
        listing
    }
    async fn destroy(&self, id: Uuid) -> Result<(), ProviderError> {
        self.inner.destroy(id).await
    }
}

#[tokio::test]
async fn a_create_recorded_while_the_refresh_lists_the_cloud_is_not_taken_for_vanished() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 60000}))
        .start()
        .await;
    let (listed, go) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let config = cloudbrain_provider_fake::FakeConfig {
        boot_time_ms: 60000,
        store_url: Some(cloudbrain_provider::Secret::new(s.db.url.clone())),
        ..Default::default()
    };
    let cloud = PausedListing {
        inner: cloudbrain_provider_fake::FakeCloud::new("fake", config),
        paused: Default::default(),
        listed: listed.clone(),
        go: go.clone(),
    };
    s.workers
        .registry
        .insert("fake", Arc::new(cloud), CallLimits::default());

    // The refresh lists the cloud (empty) and stops there ...
    let refresh = s.workers.refresh.clone();
    let cycle = tokio::spawn(async move { refresh.refresh_all().await });
    listed.notified().await;
    // ... a request comes in and its machine is made and recorded ...
    let id = s.create("ubuntu").await;
    s.workers.run_pending_jobs().await;
    assert_eq!(s.body(&id).await["state"], "starting");
    // ... and then the refresh reads the rows.
    go.notify_one();
    let reports = cycle.await.unwrap();
    assert_eq!(reports[0].1.destroyed_errored, 0, "{reports:?}");
    assert_eq!(s.body(&id).await["state"], "starting");
    assert_eq!(s.machines().await, 1);
    // The next cycle sees the machine and has nothing to say.
    s.workers.refresh.refresh_all().await;
    assert_eq!(s.body(&id).await["state"], "starting");
}

#[tokio::test]
async fn an_instance_past_its_lifetime_is_ended_with_an_expired_event() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    let body = json!({"provider": "fake", "image": "ubuntu", "ttl_seconds": 1});
    let made = s.client().post("/instances", &body).await.expect(200);
    let id = made["id"].as_str().unwrap();
    let kept = s.create("ubuntu").await;
    s.settle(id, "running").await;
    wait_for("the lifetime to end", Duration::from_secs(10), async || {
        s.workers.refresh.refresh_all().await;
        s.body(id).await["state"] == "terminating"
    })
    .await;
    s.workers.run_pending_jobs().await;
    assert_eq!(s.status(id).await, 410);
    let events = s.client().get(&format!("/instances/{id}/events")).await;
    let events = events.expect(200)["events"].as_array().unwrap().clone();
    let ended = events
        .iter()
        .find(|e| e["to_state"] == "terminating")
        .unwrap();
    assert_eq!(ended["reason"], "expired", "{events:?}");
    // The other instance, with the 3 h default, runs on.
    assert_eq!(s.body(&kept).await["state"], "running");
    assert_eq!(s.machines().await, 1);
}

/// Gives `workers` a cloud that counts the creates it ran, each of which waits while `held`
/// (if any) is locked for writing: how many it ran.
fn counted_creates(
    workers: &Workers,
    held: Option<Arc<tokio::sync::RwLock<()>>>,
) -> Arc<AtomicUsize> {
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let stub = Stub(Box::new(move |id| {
        let (ran, held) = (r.clone(), held.clone());
        async move {
            if let Some(held) = held {
                drop(held.read().await);
            }
            ran.fetch_add(1, Ordering::SeqCst);
            Ok(running(id))
        }
        .boxed()
    }));
    let limits = CallLimits {
        max_concurrency: 8,
        rate_limit: 1000.0,
    };
    workers.registry.insert("fake", Arc::new(stub), limits);
    ran
}

#[tokio::test]
async fn a_runner_whose_every_slot_is_busy_asks_whether_it_leads_once_a_poll_interval() {
    let s = TestBroker::new().fake(json!(null)).start().await;
    let settings = WorkerSettings {
        concurrency: 1,
        poll_interval: Duration::from_millis(50),
        ..fast_settings()
    };
    let workers = Workers::new(&s.db.url, settings);
    // Its one slot holds a create that waits until the test lets it go.
    let hold = Arc::new(tokio::sync::RwLock::new(()));
    counted_creates(&workers, Some(hold.clone()));
    let holding = hold.write().await;
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(workers.jobs.clone().run(s.db.url.clone(), stopped));
    let (first, waiting) = (s.create("ubuntu").await, s.create("ubuntu").await);
    wait_for("its slot to be taken", Duration::from_secs(5), async || {
        s.db.count_jobs(Jobs::Leased).await == 1
    })
    .await;

    // Its lead session, sampled every 10 ms or so for a second: each question it asks
    // moves the session's state_change.
    let mut conn = s.db.conn().await;
    let mut seen = std::collections::HashSet::new();
    let (start, mut samples) = (std::time::Instant::now(), 0);
    while start.elapsed() < Duration::from_secs(1) {
        samples += 1;
        let changed = text(
            &mut conn,
            "SELECT max(state_change)::text AS v FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND query LIKE '%pg_try_advisory_lock%'",
        )
        .await;
        seen.insert(changed.expect("the runner's lead session"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A poll every 50 ms is some 20 questions a second; without a pause, one each sample.
    assert!(
        seen.len() <= 30,
        "its lead session asked {} times in a second ({samples} samples)",
        seen.len()
    );
    drop(holding);
    for id in [&first, &waiting] {
        wait_for("both to run", Duration::from_secs(5), async || {
            s.body(id).await["state"] == "running"
        })
        .await;
    }
}

#[tokio::test]
async fn a_second_runner_helps_only_with_jobs_that_waited_and_leads_once_the_first_stops() {
    let s = TestBroker::new().fake(json!(null)).start().await;
    // One job at a time each; a helper takes jobs that waited a second.
    let settings = WorkerSettings {
        concurrency: 1,
        poll_interval: Duration::from_secs(1),
        ..fast_settings()
    };
    let (first, second) = (
        Workers::new(&s.db.url, settings.clone()),
        Workers::new(&s.db.url, settings),
    );
    // Each counts the creates it ran; the first's wait while `hold` is set.
    let hold = Arc::new(tokio::sync::RwLock::new(()));
    let first_ran = counted_creates(&first, Some(hold.clone()));
    let second_ran = counted_creates(&second, None);
    let (stop_first, first_stopped) = tokio::sync::watch::channel(false);
    let (_stop_second, second_stopped) = tokio::sync::watch::channel(false);
    let first_runs = tokio::spawn(first.jobs.clone().run(s.db.url.clone(), first_stopped));
    wait_for(
        "the first runner to lead",
        Duration::from_secs(5),
        async || first.jobs.leads(),
    )
    .await;
    tokio::spawn(second.jobs.clone().run(s.db.url.clone(), second_stopped));
    let is_running = async |id: &str| s.body(id).await["state"] == "running";
    // Asks for an instance and waits until it runs: how long that took.
    let run = async |what: &str, limit: Duration| {
        let id = s.create("ubuntu").await;
        let asked = std::time::Instant::now();
        wait_for(what, limit, async || is_running(&id).await).await;
        asked.elapsed()
    };

    // What comes while the leader keeps up is the leader's.
    for _ in 0..3 {
        run("the instance to run", Duration::from_secs(5)).await;
    }
    assert!(!second.jobs.leads());
    assert_eq!(first_ran.load(Ordering::SeqCst), 3);
    assert_eq!(second_ran.load(Ordering::SeqCst), 0);

    // The leader is full: the job after waits a second, then the helper takes it.
    let held = hold.write().await;
    let busy = s.create("ubuntu").await;
    wait_for(
        "the leader to hold its job",
        Duration::from_secs(5),
        async || s.db.count_jobs(Jobs::Leased).await == 1,
    )
    .await;
    let took = run("the helper to run it", Duration::from_secs(10)).await;
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert_eq!(second_ran.load(Ordering::SeqCst), 1);
    assert_eq!(s.body(&busy).await["state"], "creating");
    drop(held);
    wait_for(
        "the leader's job to run",
        Duration::from_secs(5),
        async || is_running(&busy).await,
    )
    .await;

    // The leader stops: the helper leads, and takes what comes at once.
    stop_first.send(true).unwrap();
    first_runs.await.unwrap();
    wait_for("the helper to lead", Duration::from_secs(5), async || {
        second.jobs.leads()
    })
    .await;
    let took = run("the new leader to run it", Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(second_ran.load(Ordering::SeqCst), 2);
    assert_eq!(first_ran.load(Ordering::SeqCst), 4);
}
