//! Process metrics in Prometheus' text format: histograms and counters kept in memory by
//! the parts of this process that do the work, plus gauges read from the database at scrape.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::auth::verifier::AuthStats;

/// Bucket upper bounds, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter()) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    dispatch: Histogram,
    provider_calls: BTreeMap<(String, &'static str), Histogram>,
    provider_errors: BTreeMap<(String, &'static str), u64>,
    jobs_finished: BTreeMap<(&'static str, &'static str), u64>,
    refresh_cycle: Histogram,
}

/// What this process has measured; share it behind an `Arc`.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Counts read from the database when metrics are scraped.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    /// Instances by (provider, state).
    pub instances: Vec<(String, String, i64)>,
    /// Jobs waiting or running, by kind.
    pub queued_jobs: Vec<(String, i64)>,
    /// Jobs out of attempts, by kind.
    pub dead_jobs: Vec<(String, i64)>,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the time from a job's enqueue to its provider call.
    pub fn observe_dispatch(&self, latency: Duration) {
        self.lock().dispatch.observe(latency.as_secs_f64());
    }

    /// Records one provider call and, when it failed, the kind of failure.
    pub fn observe_provider_call(
        &self,
        provider: &str,
        operation: &'static str,
        took: Duration,
        error_kind: Option<&'static str>,
    ) {
        let mut inner = self.lock();
        inner
            .provider_calls
            .entry((provider.to_owned(), operation))
            .or_default()
            .observe(took.as_secs_f64());
        if let Some(kind) = error_kind {
            *inner
                .provider_errors
                .entry((provider.to_owned(), kind))
                .or_default() += 1;
        }
    }

    /// Records how long one refresh cycle took (every provider config, then the pools).
    pub fn observe_refresh_cycle(&self, took: Duration) {
        self.lock().refresh_cycle.observe(took.as_secs_f64());
    }

    /// Counts a job that ended (`done`, `retried`, `dead`, `released`).
    pub fn count_job(&self, kind: &'static str, outcome: &'static str) {
        *self
            .lock()
            .jobs_finished
            .entry((kind, outcome))
            .or_default() += 1;
    }

    /// The Prometheus text exposition of everything measured plus `gauges` and `auth`.
    pub fn render(&self, gauges: &Gauges, auth: Option<AuthStats>) -> String {
        let mut out = String::new();
        out.push_str("# HELP cloudbrain_instances Instances by provider and state.\n# TYPE cloudbrain_instances gauge\n");
        for (provider, state, n) in &gauges.instances {
            let _ = writeln!(
                out,
                "cloudbrain_instances{{provider=\"{}\",state=\"{}\"}} {n}",
                escape(provider),
                escape(state)
            );
        }
        out.push_str("# HELP cloudbrain_jobs_queued Jobs waiting or running, by kind.\n# TYPE cloudbrain_jobs_queued gauge\n");
        for (kind, n) in &gauges.queued_jobs {
            let _ = writeln!(
                out,
                "cloudbrain_jobs_queued{{kind=\"{}\"}} {n}",
                escape(kind)
            );
        }
        out.push_str("# HELP cloudbrain_jobs_dead Jobs out of attempts, kept for inspection, by kind.\n# TYPE cloudbrain_jobs_dead gauge\n");
        for (kind, n) in &gauges.dead_jobs {
            let _ = writeln!(out, "cloudbrain_jobs_dead{{kind=\"{}\"}} {n}", escape(kind));
        }
        let inner = self.lock();
        out.push_str("# HELP cloudbrain_dispatch_latency_seconds Time from a job's enqueue to its provider call, in this process.\n# TYPE cloudbrain_dispatch_latency_seconds histogram\n");
        inner
            .dispatch
            .render(&mut out, "cloudbrain_dispatch_latency_seconds", "");
        out.push_str("# HELP cloudbrain_refresh_cycle_seconds Refresh cycles of this process: every provider config, then the pools.\n# TYPE cloudbrain_refresh_cycle_seconds histogram\n");
        inner
            .refresh_cycle
            .render(&mut out, "cloudbrain_refresh_cycle_seconds", "");
        out.push_str("# HELP cloudbrain_provider_call_duration_seconds Provider calls made by this process.\n# TYPE cloudbrain_provider_call_duration_seconds histogram\n");
        for ((provider, operation), histogram) in &inner.provider_calls {
            let labels = format!(
                "provider=\"{}\",operation=\"{operation}\"",
                escape(provider)
            );
            histogram.render(
                &mut out,
                "cloudbrain_provider_call_duration_seconds",
                &labels,
            );
        }
        out.push_str("# HELP cloudbrain_provider_errors_total Failed provider calls by kind.\n# TYPE cloudbrain_provider_errors_total counter\n");
        for ((provider, kind), n) in &inner.provider_errors {
            let _ = writeln!(
                out,
                "cloudbrain_provider_errors_total{{provider=\"{}\",kind=\"{kind}\"}} {n}",
                escape(provider)
            );
        }
        out.push_str("# HELP cloudbrain_jobs_finished_total Jobs this process ended, by kind and outcome.\n# TYPE cloudbrain_jobs_finished_total counter\n");
        for ((kind, outcome), n) in &inner.jobs_finished {
            let _ = writeln!(
                out,
                "cloudbrain_jobs_finished_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        if let Some(auth) = auth {
            for (name, kind, help, value) in [
                (
                    "cloudbrain_auth_cache_hits_total",
                    "counter",
                    "Requests authenticated from the verified-token cache.",
                    auth.cache_hits,
                ),
                (
                    "cloudbrain_auth_cache_misses_total",
                    "counter",
                    "Requests that needed the token store.",
                    auth.cache_misses,
                ),
                (
                    "cloudbrain_auth_scrypt_runs_total",
                    "counter",
                    "scrypt verifications run.",
                    auth.scrypt_runs,
                ),
                (
                    "cloudbrain_auth_scrypt_peak",
                    "gauge",
                    "Most scrypt verifications that ran at once.",
                    auth.scrypt_peak,
                ),
                (
                    "cloudbrain_auth_scrypt_busy_total",
                    "counter",
                    "Verifications refused with 503 because every scrypt slot stayed busy.",
                    auth.scrypt_busy,
                ),
            ] {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let metrics = Metrics::default();
        metrics.observe_dispatch(Duration::from_millis(3));
        metrics.observe_dispatch(Duration::from_millis(700));
        let text = metrics.render(&Gauges::default(), None);
        assert!(
            text.contains("cloudbrain_dispatch_latency_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("cloudbrain_dispatch_latency_seconds_bucket{le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("cloudbrain_dispatch_latency_seconds_count 2\n"),
            "{text}"
        );
    }
}
