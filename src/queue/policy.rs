//! What a failed job leads to: one pure function of the error, the attempts made and the
//! settings, so every case is a table test.

use std::time::Duration;

use cloudbrain_provider::ProviderError;

use crate::config::WorkerSettings;

/// Why a job did not finish.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The cloud said no, or could not be reached.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The broker's database failed.
    #[error("{0:#}")]
    Store(anyhow::Error),
    /// The job can never succeed as it is; the text says why.
    #[error("{0}")]
    Refused(String),
    /// What the job waits for has not happened yet; counted like a failure.
    #[error("{0}")]
    NotYet(String),
    /// The job must wait for another to end first; handed back uncounted.
    #[error("waiting for {what}")]
    Wait {
        /// What it waits for.
        what: std::borrow::Cow<'static, str>,
        /// How long before it is tried again.
        delay: Duration,
    },
    /// The job's code panicked.
    #[error("job panicked: {0}")]
    Panicked(String),
    /// Another worker holds the job now (this one's lease ran out): that one decides.
    #[error("the lease was lost to another worker")]
    Lost,
}

/// What the runner does with a job after an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Run it again after a delay from `at_least` to `at_least + spread`, chosen at random
    /// so retries do not stampede.
    Retry {
        /// The shortest delay.
        at_least: Duration,
        /// How much longer it may be.
        spread: Duration,
    },
    /// Hand it back uncounted, to run after `delay`.
    Release(Duration),
    /// Give up: the job is dead and its instance errored with this reason.
    Bury(String),
    /// Nothing: the job is another worker's.
    Leave,
}

/// What `error` on attempt `attempts` (counting from 1) leads to under `settings`.
pub fn next(error: &JobError, attempts: i32, settings: &WorkerSettings) -> Next {
    let out_of_attempts = attempts >= settings.max_attempts;
    match error {
        JobError::Lost => Next::Leave,
        JobError::Wait { delay, .. } => Next::Release(*delay),
        JobError::Refused(reason) => Next::Bury(reason.clone()),
        JobError::Provider(ProviderError::Invalid(message)) => {
            Next::Bury(format!("the provider refused the request: {message}"))
        }
        _ if out_of_attempts => Next::Bury(format!("gave up after {attempts} attempts: {error}")),
        JobError::Provider(ProviderError::Throttled {
            retry_after: Some(wait),
        }) => {
            // Honour the cloud's word, plus a little so retries do not stampede.
            Next::Retry {
                at_least: *wait + *wait / 20,
                spread: *wait / 20,
            }
        }
        _ => {
            let exponent = (attempts.max(1) - 1).min(30) as u32;
            let delay = settings
                .backoff_base
                .saturating_mul(2u32.saturating_pow(exponent))
                .min(settings.backoff_max);
            Next::Retry {
                at_least: delay / 2,
                spread: delay - delay / 2,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WorkerSettings {
        WorkerSettings {
            max_attempts: 4,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(5),
            ..WorkerSettings::default()
        }
    }

    fn retry(at_least_ms: u64, spread_ms: u64) -> Next {
        Next::Retry {
            at_least: Duration::from_millis(at_least_ms),
            spread: Duration::from_millis(spread_ms),
        }
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_cap_then_give_up() {
        let transient = || JobError::Provider(ProviderError::Transient("timeout".into()));
        let s = settings();
        assert_eq!(next(&transient(), 1, &s), retry(500, 500));
        assert_eq!(next(&transient(), 2, &s), retry(1000, 1000));
        assert_eq!(next(&transient(), 3, &s), retry(2000, 2000));
        let capped = WorkerSettings {
            max_attempts: 10,
            ..settings()
        };
        assert_eq!(next(&transient(), 9, &capped), retry(2500, 2500));
        assert_eq!(
            next(&transient(), 4, &s),
            Next::Bury("gave up after 4 attempts: transient error: timeout".into())
        );
    }

    #[test]
    fn every_kind_of_error_has_its_answer() {
        let s = settings();
        let throttled = |secs| {
            JobError::Provider(ProviderError::Throttled {
                retry_after: Some(Duration::from_secs(secs)),
            })
        };
        let table: Vec<(JobError, i32, Next)> = vec![
            (
                JobError::Provider(ProviderError::Invalid("no such image".into())),
                1,
                Next::Bury("the provider refused the request: no such image".into()),
            ),
            (
                JobError::Refused("provider x is not registered".into()),
                1,
                Next::Bury("provider x is not registered".into()),
            ),
            (throttled(20), 1, retry(21_000, 1_000)),
            (
                throttled(20),
                4,
                Next::Bury("gave up after 4 attempts: throttled by the cloud".into()),
            ),
            (
                JobError::Provider(ProviderError::Throttled { retry_after: None }),
                2,
                retry(1000, 1000),
            ),
            (
                JobError::Provider(ProviderError::Capacity("none left".into())),
                1,
                retry(500, 500),
            ),
            (
                JobError::NotYet("still shutting down".into()),
                1,
                retry(500, 500),
            ),
            (
                JobError::Store(anyhow::anyhow!("connection reset")),
                4,
                Next::Bury("gave up after 4 attempts: connection reset".into()),
            ),
            (
                JobError::Panicked("oops".into()),
                4,
                Next::Bury("gave up after 4 attempts: job panicked: oops".into()),
            ),
            (
                JobError::Wait {
                    what: "the create call".into(),
                    delay: Duration::from_secs(1),
                },
                4,
                Next::Release(Duration::from_secs(1)),
            ),
            (JobError::Lost, 4, Next::Leave),
        ];
        for (error, attempts, expected) in table {
            assert_eq!(
                next(&error, attempts, &s),
                expected,
                "{error:?} on attempt {attempts}"
            );
        }
    }
}
