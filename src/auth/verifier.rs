//! Authenticates presented tokens: scrypt at most once per token per cache lifetime, never
//! for an unknown id, never for an id being guessed at, and revocation seen by every
//! process within a second through LISTEN/NOTIFY.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::store::{self, REVOKED_CHANNEL};
use super::token::{hash_secret, Token};
use super::Caller;
use crate::db::listen::{listen_forever, Heard};
use crate::db::Pool;
use crate::ids::TokenId;

/// Wrong secrets from one address tolerated per [`FAILURE_WINDOW`] before it is throttled.
pub const MAX_FAILURES: u32 = 10;
/// The window in which failures are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How often `last_used_at` is written for one token at most.
const TOUCH_INTERVAL: Duration = Duration::from_secs(60);
/// Past this many entries, a map is swept of stale ones.
const SWEEP_AT: usize = 10_000;

/// Why a request is not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token, a malformed one, an unknown id, a wrong secret or a revoked token: callers
    /// must not be able to tell these apart.
    #[error("invalid or missing token")]
    Rejected,
    /// Too many wrong secrets from this address lately.
    #[error("too many failed attempts; retry in {retry_after:?}")]
    Throttled {
        /// How long until attempts are accepted again.
        retry_after: Duration,
    },
    /// Every scrypt slot stayed busy for the whole wait: try again shortly.
    #[error("too many token verifications at once")]
    Busy {
        /// How long to wait before trying again.
        retry_after: Duration,
    },
    /// The token store cannot be reached, so nothing can be decided.
    #[error("token store unavailable")]
    Unavailable,
}

/// Counters of the verifier's work, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuthStats {
    /// Requests answered from the verified-token cache.
    pub cache_hits: u64,
    /// Requests that were not: refused by the store, or verified with scrypt.
    pub cache_misses: u64,
    /// scrypt computations run.
    pub scrypt_runs: u64,
    /// Most scrypt computations that ran at once.
    pub scrypt_peak: u64,
    /// Verifications refused because every scrypt slot stayed busy.
    pub scrypt_busy: u64,
}

/// How much scrypt one process may run: each run holds 16 MiB and a core for tens of
/// milliseconds, so an unbounded number is a lever for anyone who can send requests.
#[derive(Debug, Clone, Copy)]
pub struct ScryptLimits {
    /// Most verifications at once (`CLOUDBRAIN_SCRYPT_CONCURRENCY`, default: the cores).
    pub concurrency: usize,
    /// How long a verification waits for a slot before the request gets 503
    /// (`CLOUDBRAIN_SCRYPT_WAIT`, default 5 s: long enough for a hundred new tokens
    /// at once on two cores).
    pub wait: Duration,
}

impl Default for ScryptLimits {
    fn default() -> Self {
        Self {
            concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            wait: Duration::from_secs(5),
        }
    }
}

struct Verified {
    caller: Caller,
    at: Instant,
}

/// What one address has done lately: wrong secrets in the current window, and
/// verifications under way whose outcome is not known yet.
struct Failures {
    since: Instant,
    count: u32,
    in_flight: u32,
}

#[derive(Default)]
struct State {
    /// Keyed by SHA-256 of the presented token, so the cache never holds a secret.
    verified: HashMap<[u8; 32], Verified>,
    /// One lock per token being verified, so concurrent first requests run scrypt once.
    in_flight: HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>,
    /// Wrong secrets (and verifications under way) by the caller's address.
    failures: HashMap<IpAddr, Failures>,
    touched: HashMap<TokenId, Instant>,
}

/// An attempt counted against an address while it runs; it ends when dropped, on every
/// path, as a failure only when a wrong secret was found.
struct Attempt<'a> {
    verifier: &'a TokenVerifier,
    address: IpAddr,
    failed: bool,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.verifier.end_attempt(self.address, self.failed);
    }
}

/// Authenticates tokens for one process; share it behind an `Arc`.
pub struct TokenVerifier {
    pool: Pool,
    ttl: Duration,
    state: Mutex<State>,
    /// True while the revocation listener is connected: only then is the cache trusted
    /// without asking the database whether the token was revoked.
    listening: AtomicBool,
    /// Bumped on every revocation, so a verification that raced one is not cached.
    revocations: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    scrypt_runs: AtomicU64,
    scrypt_slots: tokio::sync::Semaphore,
    scrypt_wait: Duration,
    scrypt_now: AtomicUsize,
    scrypt_peak: AtomicUsize,
    scrypt_busy: AtomicU64,
    /// Signalled whenever a counted attempt ends.
    attempt_ended: tokio::sync::Notify,
}

impl TokenVerifier {
    /// A verifier reading tokens through `pool`, trusting a verification for `ttl`, with
    /// the default scrypt limits.
    pub fn new(pool: Pool, ttl: Duration) -> Self {
        Self::with_limits(pool, ttl, ScryptLimits::default())
    }

    /// A verifier that runs at most `limits.concurrency` scrypts at once.
    pub fn with_limits(pool: Pool, ttl: Duration, limits: ScryptLimits) -> Self {
        Self {
            pool,
            ttl,
            state: Mutex::new(State::default()),
            listening: AtomicBool::new(false),
            revocations: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            scrypt_runs: AtomicU64::new(0),
            scrypt_slots: tokio::sync::Semaphore::new(limits.concurrency.max(1)),
            scrypt_wait: limits.wait,
            scrypt_now: AtomicUsize::new(0),
            scrypt_peak: AtomicUsize::new(0),
            scrypt_busy: AtomicU64::new(0),
            attempt_ended: tokio::sync::Notify::new(),
        }
    }

    /// What the verifier has done so far.
    pub fn stats(&self) -> AuthStats {
        AuthStats {
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.cache_misses.load(Ordering::Relaxed),
            scrypt_runs: self.scrypt_runs.load(Ordering::Relaxed),
            scrypt_peak: self.scrypt_peak.load(Ordering::Relaxed) as u64,
            scrypt_busy: self.scrypt_busy.load(Ordering::Relaxed),
        }
    }

    /// True while revocations are being heard.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves only caches behind: keep using them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Authenticates a token as presented by a client (`<id>-<32 hex>`) from `address`.
    ///
    /// A wrong secret counts against the caller's address, not the token: a stranger
    /// guessing at token N throttles only themselves, never N's holder. The attempt is
    /// counted before scrypt runs, so concurrent guesses from one address get at most
    /// [`MAX_FAILURES`] hashes, and at most [`ScryptLimits::concurrency`] hashes run at once.
    pub async fn verify(&self, presented: &str, address: IpAddr) -> Result<Caller, AuthError> {
        let token: Token = presented
            .parse()
            .map_err(|_malformed| AuthError::Rejected)?;
        let key: [u8; 32] = Sha256::digest(token.to_string().as_bytes()).into();

        if let Some(caller) = self.cached(&key) {
            if self.is_listening() || !self.revoked_in_store(token.id).await? {
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                self.touch(caller.token_id);
                return Ok(caller);
            }
            self.forget_token(token.id);
            return Err(AuthError::Rejected);
        }
        // Counted from here on, before the token store is asked, so a storm of guesses
        // from one address waits here rather than queueing for database connections.
        self.reserve_attempt(address).await?;
        let mut attempt = Attempt {
            verifier: self,
            address,
            failed: false,
        };

        let epoch = self.revocations.load(Ordering::Acquire);
        let row = {
            let mut conn = self.pool.get().await.map_err(unavailable)?;
            store::find_token(&mut conn, token.id)
                .await
                .map_err(unavailable)?
        };
        // Unknown and revoked ids are refused without scrypt: they cost an attacker a query.
        let Some(row) = row.filter(|r| r.revoked_at.is_none()) else {
            self.cache_misses.fetch_add(1, Ordering::Relaxed);
            return Err(AuthError::Rejected);
        };

        let slot = self.lock().in_flight.entry(key).or_default().clone();
        let turn = slot.lock().await;
        let result = self.verify_in_turn(&token, &row, &key, epoch).await;
        drop(turn);
        attempt.failed = result
            .as_ref()
            .is_err_and(|e| matches!(e, AuthError::Rejected));
        drop(attempt);
        // On every path, so refused guesses leave nothing behind.
        self.lock().in_flight.remove(&key);
        let caller = result?;
        self.touch(caller.token_id);
        Ok(caller)
    }

    /// The part of [`TokenVerifier::verify`] that runs once per token at a time.
    async fn verify_in_turn(
        &self,
        token: &Token,
        row: &store::AuthToken,
        key: &[u8; 32],
        epoch: u64,
    ) -> Result<Caller, AuthError> {
        if let Some(caller) = self.cached(key) {
            // Verified by a concurrent request while this one waited its turn.
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(caller);
        }
        if !self.hash_matches(token, row).await? {
            return Err(AuthError::Rejected);
        }
        let caller = Caller {
            token_id: row.id,
            scope: row.scope,
        };
        let mut state = self.lock();
        if self.revocations.load(Ordering::Acquire) == epoch {
            let now = Instant::now();
            if state.verified.len() > SWEEP_AT {
                let ttl = self.ttl;
                state.verified.retain(|_, v| now.duration_since(v.at) < ttl);
            }
            state.verified.insert(*key, Verified { caller, at: now });
        }
        Ok(caller)
    }

    /// Runs scrypt in one of the bounded slots, waiting at most the configured time for one.
    async fn hash_matches(&self, token: &Token, row: &store::AuthToken) -> Result<bool, AuthError> {
        let Ok(Ok(_permit)) =
            tokio::time::timeout(self.scrypt_wait, self.scrypt_slots.acquire()).await
        else {
            self.scrypt_busy.fetch_add(1, Ordering::Relaxed);
            return Err(AuthError::Busy {
                retry_after: self.scrypt_wait.max(Duration::from_secs(1)),
            });
        };
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
        self.scrypt_runs.fetch_add(1, Ordering::Relaxed);
        let now = self.scrypt_now.fetch_add(1, Ordering::AcqRel) + 1;
        self.scrypt_peak.fetch_max(now, Ordering::AcqRel);
        let secret = token.secret;
        let salt = row.token_salt.clone();
        let computed = tokio::task::spawn_blocking(move || hash_secret(&secret, &salt)).await;
        self.scrypt_now.fetch_sub(1, Ordering::AcqRel);
        let computed = computed.map_err(unavailable)?;
        Ok(computed.ct_eq(row.token_hash.as_slice()).into())
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Caller> {
        let state = self.lock();
        state
            .verified
            .get(key)
            .filter(|v| v.at.elapsed() < self.ttl)
            .map(|v| v.caller)
    }

    /// Counts an attempt from `address` before its scrypt runs. Attempts under way count
    /// as possible failures: while they and the failures already seen reach the limit, a
    /// new attempt waits (within the scrypt wait) for one to end, so concurrent wrong
    /// secrets run no more hashes than the throttle allows and concurrent right ones are
    /// only delayed. Out of attempts is 429.
    async fn reserve_attempt(&self, address: IpAddr) -> Result<(), AuthError> {
        let deadline = tokio::time::Instant::now() + self.scrypt_wait;
        loop {
            let ended = self.attempt_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.try_reserve(address)? {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                self.scrypt_busy.fetch_add(1, Ordering::Relaxed);
                return Err(AuthError::Busy {
                    retry_after: self.scrypt_wait.max(Duration::from_secs(1)),
                });
            }
        }
    }

    /// Reserves an attempt if the address has one to spare: `Ok(false)` when attempts under
    /// way might still use up what is left.
    fn try_reserve(&self, address: IpAddr) -> Result<bool, AuthError> {
        let mut state = self.lock();
        let now = Instant::now();
        if state.failures.len() > SWEEP_AT {
            state
                .failures
                .retain(|_, f| f.in_flight > 0 || now.duration_since(f.since) <= FAILURE_WINDOW);
        }
        let failures = state.failures.entry(address).or_insert(Failures {
            since: now,
            count: 0,
            in_flight: 0,
        });
        if now.duration_since(failures.since) > FAILURE_WINDOW {
            failures.since = now;
            failures.count = 0;
        }
        if failures.count >= MAX_FAILURES {
            return Err(AuthError::Throttled {
                retry_after: FAILURE_WINDOW.saturating_sub(now.duration_since(failures.since)),
            });
        }
        if failures.count + failures.in_flight >= MAX_FAILURES {
            return Ok(false);
        }
        failures.in_flight += 1;
        Ok(true)
    }

    /// Ends an attempt [`TokenVerifier::reserve_attempt`] counted, as a failure or not,
    /// and wakes attempts waiting for it.
    fn end_attempt(&self, address: IpAddr, failed: bool) {
        if let Some(failures) = self.lock().failures.get_mut(&address) {
            failures.in_flight = failures.in_flight.saturating_sub(1);
            if failed {
                failures.count += 1;
            }
        }
        self.attempt_ended.notify_waiters();
    }

    async fn revoked_in_store(&self, id: TokenId) -> Result<bool, AuthError> {
        let mut conn = self.pool.get().await.map_err(unavailable)?;
        let row = store::find_token(&mut conn, id)
            .await
            .map_err(unavailable)?;
        Ok(row.is_none_or(|r| r.revoked_at.is_some()))
    }

    /// Writes `last_used_at` in the background, at most once a minute per token.
    fn touch(&self, id: TokenId) {
        let now = Instant::now();
        {
            let mut state = self.lock();
            if state
                .touched
                .get(&id)
                .is_some_and(|at| now.duration_since(*at) < TOUCH_INTERVAL)
            {
                return;
            }
            if state.touched.len() > SWEEP_AT {
                state
                    .touched
                    .retain(|_, at| now.duration_since(*at) < TOUCH_INTERVAL);
            }
            state.touched.insert(id, now);
        }
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let result = match pool.get().await {
                Ok(mut conn) => store::touch_last_used(&mut conn, id)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(error) = result {
                tracing::warn!(token.id = %id, %error, "could not record last use of token {id}");
            }
        });
    }

    /// Drops every cached verification of token `id` (it was revoked).
    pub fn forget_token(&self, id: TokenId) {
        self.revocations.fetch_add(1, Ordering::AcqRel);
        self.lock().verified.retain(|_, v| v.caller.token_id != id);
    }

    fn forget_all(&self) {
        self.revocations.fetch_add(1, Ordering::AcqRel);
        self.lock().verified.clear();
    }

    /// Listens for revocations until the process ends, reconnecting when the connection
    /// drops; while it is down, cached tokens are checked against the database.
    pub async fn listen_for_revocations(self: Arc<Self>, database_url: String) {
        listen_forever(database_url, REVOKED_CHANNEL, |heard| match heard {
            Heard::Connected => {
                // Revocations may have been missed while disconnected: start afresh.
                self.forget_all();
                self.listening.store(true, Ordering::Release);
            }
            Heard::Disconnected => self.listening.store(false, Ordering::Release),
            Heard::Payload(payload) => match payload.parse::<i32>() {
                Ok(id) => self.forget_token(TokenId(id)),
                Err(_) => self.forget_all(),
            },
        })
        .await
    }
}

/// The token store could not answer: refused as unavailable (503), and logged at most once
/// a second with how many went unlogged since, so a storm of requests during an outage
/// cannot flood the log.
fn unavailable(error: impl std::fmt::Display) -> AuthError {
    static LAST_SECOND: AtomicU64 = AtomicU64::new(0);
    static UNLOGGED: AtomicU64 = AtomicU64::new(0);
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    if LAST_SECOND.swap(second, Ordering::AcqRel) == second {
        UNLOGGED.fetch_add(1, Ordering::AcqRel);
    } else {
        let unlogged = UNLOGGED.swap(0, Ordering::AcqRel);
        tracing::warn!(%error, unlogged, "the token store is unavailable");
    }
    AuthError::Unavailable
}
