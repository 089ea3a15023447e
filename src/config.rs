//! Typed settings, read once from the environment and passed down.

use std::net::SocketAddr;
use std::time::Duration;

use crate::crypto::SecretKey;

/// Database connections a process pools when `CLOUDBRAIN_DATABASE_POOL_SIZE` is not set:
/// `http` (shared out over its worker threads), `refresh-worker` and `dev`.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// Database connections a `create-worker` pools when `CLOUDBRAIN_DATABASE_POOL_SIZE` is not
/// set. Its jobs hold one only while a statement runs, and Postgres does more with fewer
/// busy sessions: a backlog drained by one worker of 8 ran 1.08-1.12 times as fast as with
/// 16, at less CPU per job (docs/benchmarks.md).
pub const JOB_WORKER_POOL_SIZE: usize = 8;

/// Settings of every cloudbrain process, from `CLOUDBRAIN_*`, `DATABASE_URL` and `PORT`.
#[derive(Clone)]
pub struct Config {
    /// Postgres connection string (`DATABASE_URL`): the pool's connections.
    pub database_url: String,
    /// A connection string straight to Postgres (`CLOUDBRAIN_DIRECT_DATABASE_URL`), for
    /// what must stay on one server session: LISTEN, advisory locks, migrations. Setting it
    /// says `DATABASE_URL` goes through a transaction-mode pooler such as PgBouncer.
    pub direct_database_url: Option<String>,
    /// Where `http` listens: `CLOUDBRAIN_ADDR`, else `0.0.0.0:$PORT`, else `127.0.0.1:42191`.
    pub addr: SocketAddr,
    /// Key that seals provider configs (`CLOUDBRAIN_DATABASE_ENCRYPTION_KEY`), when set.
    pub encryption_key: Option<SecretKey>,
    /// Largest number of pooled database connections (`CLOUDBRAIN_DATABASE_POOL_SIZE`);
    /// unset, the role's own ([`DEFAULT_POOL_SIZE`], [`JOB_WORKER_POOL_SIZE`]).
    pub pool_size: Option<usize>,
    /// How long a handler may run before the request fails with 503 (`CLOUDBRAIN_REQUEST_TIMEOUT`).
    pub request_timeout: Duration,
    /// How long a request body may take to arrive before the request fails with 408
    /// (`CLOUDBRAIN_BODY_TIMEOUT`).
    pub body_timeout: Duration,
    /// How long SIGTERM waits for in-flight requests (`CLOUDBRAIN_SHUTDOWN_TIMEOUT`).
    pub shutdown_timeout: Duration,
    /// How long a verified token is trusted without scrypt (`CLOUDBRAIN_AUTH_CACHE_TTL`).
    pub auth_cache_ttl: Duration,
    /// Proxies whose `X-Forwarded-For` names the client (`CLOUDBRAIN_TRUSTED_PROXIES`).
    pub trusted_proxies: Networks,
    /// Bounds on scrypt (`CLOUDBRAIN_SCRYPT_CONCURRENCY`, `CLOUDBRAIN_SCRYPT_WAIT`).
    pub scrypt: crate::auth::verifier::ScryptLimits,
    /// Logs as JSON lines when `CLOUDBRAIN_LOG_FORMAT=json`.
    pub log_json: bool,
    /// Where a worker process serves `/metrics` (`CLOUDBRAIN_METRICS_ADDR`), if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The longest an instance lives, and how long it lives when its request does not say
    /// (`CLOUDBRAIN_DEFAULT_MAX_LIFETIME`, seconds, 3 h; 0: until given back).
    pub max_lifetime: Option<Duration>,
    /// How often an idle event stream gets a heartbeat comment
    /// (`CLOUDBRAIN_STREAM_HEARTBEAT`, seconds, 15).
    pub stream_heartbeat: Duration,
    /// How the workers run jobs and reconcile.
    pub workers: WorkerSettings,
    /// How webhook deliveries are made.
    pub webhooks: DeliverySettings,
}

/// How long an instance lives unless its request asks for less: 3 h, what Cloud Brain's
/// sweeper of old machines allowed.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(3 * 3600);

/// A list of addresses and networks (`10.0.0.0/8`, `::1`, …): the proxies whose
/// `X-Forwarded-For` is believed, the private networks webhooks may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Networks(Vec<(std::net::IpAddr, u8)>);

impl Networks {
    /// Reads a comma-separated list of addresses and CIDR networks.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut networks = Vec::new();
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (addr, bits) = match item.split_once('/') {
                Some((addr, bits)) => (addr, Some(bits)),
                None => (item, None),
            };
            let addr: std::net::IpAddr = addr
                .parse()
                .map_err(|_not_an_address| format!("{item:?} is not an address or network"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                None => max,
                Some(bits) => bits
                    .parse::<u8>()
                    .ok()
                    .filter(|b| *b <= max)
                    .ok_or_else(|| format!("{item:?} has a bad prefix length"))?,
            };
            networks.push((addr, bits));
        }
        Ok(Self(networks))
    }

    /// True when `ip` is in one of the networks.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        fn bits(ip: std::net::IpAddr) -> u128 {
            match ip {
                std::net::IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
                std::net::IpAddr::V6(v6) => u128::from(v6),
            }
        }
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        // Both families sit in the top bits, so a prefix masks the same way for each.
        self.0.iter().any(|(net, len)| {
            let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
            net.is_ipv4() == ip.is_ipv4() && bits(*net) & mask == bits(ip) & mask
        })
    }
}

/// How deliveries are made: which private networks they may reach, how long one attempt
/// may take and how long a failing delivery is retried.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Loopback, link-local and private networks deliveries may reach
    /// (`CLOUDBRAIN_WEBHOOK_ALLOW_NETWORKS`); every public address may be reached.
    pub allowed: Networks,
    /// One attempt's limit (`CLOUDBRAIN_WEBHOOK_TIMEOUT`, 10 s).
    pub timeout: Duration,
    /// How long a failing delivery is retried before it is failed
    /// (`CLOUDBRAIN_WEBHOOK_RETRY_FOR`, 24 h).
    pub retry_for: Duration,
    /// The first retry's delay, doubled each attempt (`CLOUDBRAIN_WEBHOOK_BACKOFF_BASE`, 1 s).
    pub backoff_base: Duration,
    /// The longest delay between attempts (1 h).
    pub backoff_max: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            allowed: Networks::default(),
            timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(24 * 3600),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(3600),
        }
    }
}

/// Settings of the create and refresh workers.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Jobs one worker process runs at once (`CLOUDBRAIN_WORKER_CONCURRENCY`, default 16).
    pub concurrency: usize,
    /// How long a claimed job is leased, renewed while it runs (`CLOUDBRAIN_JOB_LEASE`, 60 s).
    pub lease: Duration,
    /// How often an idle worker looks for jobs without being woken, and how long a job
    /// waits before a runner that does not lead takes it (`CLOUDBRAIN_WORKER_POLL_INTERVAL`, 1 s).
    pub poll_interval: Duration,
    /// Attempts before a job is dead and its instance errored (`CLOUDBRAIN_JOB_MAX_ATTEMPTS`, 10).
    pub max_attempts: i32,
    /// First retry delay, doubled each attempt (`CLOUDBRAIN_JOB_BACKOFF_BASE`, 1 s).
    pub backoff_base: Duration,
    /// Longest retry delay (`CLOUDBRAIN_JOB_BACKOFF_MAX`, 300 s).
    pub backoff_max: Duration,
    /// How often the refresh worker reconciles each provider (`CLOUDBRAIN_REFRESH_INTERVAL`, 10 s).
    pub refresh_interval: Duration,
    /// How long an instance may take to reach `running` (`CLOUDBRAIN_LAUNCH_TIMEOUT`, 600 s).
    pub launch_timeout: Duration,
    /// How old a machine with no live instance must be before it is destroyed as an orphan
    /// (`CLOUDBRAIN_ORPHAN_GRACE`, 300 s).
    pub orphan_grace: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 16,
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            max_attempts: 10,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            refresh_interval: Duration::from_secs(10),
            launch_timeout: Duration::from_secs(600),
            orphan_grace: Duration::from_secs(300),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The database URL may carry a password and the key is a secret: neither is printed.
        f.debug_struct("Config")
            .field("addr", &self.addr)
            .field("pool_size", &self.pool_size)
            .field("request_timeout", &self.request_timeout)
            .field("auth_cache_ttl", &self.auth_cache_ttl)
            .finish_non_exhaustive()
    }
}

/// A setting that is missing or malformed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is not set.
    #[error("{0} is not set")]
    Missing(&'static str),
    /// A variable is set to something that cannot be used.
    #[error("{name} is invalid: {message}")]
    Invalid {
        /// The variable's name.
        name: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// Cloud Brain's port, kept so its clients need no change.
pub const DEFAULT_PORT: u16 = 42191;

impl Config {
    /// Reads the settings from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup`, so tests need not touch the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let database_url = get("DATABASE_URL").ok_or(ConfigError::Missing("DATABASE_URL"))?;
        let addr = match (get("CLOUDBRAIN_ADDR"), get("PORT")) {
            (Some(addr), _) => parse_addr("CLOUDBRAIN_ADDR", &addr)?,
            (None, Some(port)) => {
                let port: u16 = port.parse().map_err(|_not_a_port| ConfigError::Invalid {
                    name: "PORT",
                    message: format!("{port:?} is not a port number"),
                })?;
                SocketAddr::from(([0, 0, 0, 0], port))
            }
            (None, None) => SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
        };
        let encryption_key = get("CLOUDBRAIN_DATABASE_ENCRYPTION_KEY")
            .map(|hex| {
                SecretKey::from_hex(&hex).map_err(|message| ConfigError::Invalid {
                    name: "CLOUDBRAIN_DATABASE_ENCRYPTION_KEY",
                    message,
                })
            })
            .transpose()?;
        Ok(Self {
            database_url,
            direct_database_url: get("CLOUDBRAIN_DIRECT_DATABASE_URL"),
            addr,
            encryption_key,
            pool_size: parse_optional_number(&get, "CLOUDBRAIN_DATABASE_POOL_SIZE")?,
            request_timeout: parse_seconds(
                &get,
                "CLOUDBRAIN_REQUEST_TIMEOUT",
                Duration::from_secs(30),
            )?,
            body_timeout: parse_seconds(&get, "CLOUDBRAIN_BODY_TIMEOUT", Duration::from_secs(10))?,
            shutdown_timeout: parse_seconds(
                &get,
                "CLOUDBRAIN_SHUTDOWN_TIMEOUT",
                Duration::from_secs(30),
            )?,
            auth_cache_ttl: parse_seconds(
                &get,
                "CLOUDBRAIN_AUTH_CACHE_TTL",
                Duration::from_secs(300),
            )?,
            trusted_proxies: get("CLOUDBRAIN_TRUSTED_PROXIES")
                .map(|list| {
                    Networks::parse(&list).map_err(|message| ConfigError::Invalid {
                        name: "CLOUDBRAIN_TRUSTED_PROXIES",
                        message,
                    })
                })
                .transpose()?
                .unwrap_or_default(),
            scrypt: {
                let d = crate::auth::verifier::ScryptLimits::default();
                crate::auth::verifier::ScryptLimits {
                    concurrency: parse_number(
                        &get,
                        "CLOUDBRAIN_SCRYPT_CONCURRENCY",
                        d.concurrency,
                    )?,
                    wait: parse_seconds(&get, "CLOUDBRAIN_SCRYPT_WAIT", d.wait)?,
                }
            },
            log_json: get("CLOUDBRAIN_LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json")),
            metrics_addr: get("CLOUDBRAIN_METRICS_ADDR")
                .map(|a| parse_addr("CLOUDBRAIN_METRICS_ADDR", &a))
                .transpose()?,
            max_lifetime: Some(parse_seconds(
                &get,
                "CLOUDBRAIN_DEFAULT_MAX_LIFETIME",
                DEFAULT_MAX_LIFETIME,
            )?)
            .filter(|lifetime| !lifetime.is_zero()),
            stream_heartbeat: parse_seconds(
                &get,
                "CLOUDBRAIN_STREAM_HEARTBEAT",
                Duration::from_secs(15),
            )?
            .max(Duration::from_millis(100)),
            webhooks: {
                let d = DeliverySettings::default();
                DeliverySettings {
                    allowed: get("CLOUDBRAIN_WEBHOOK_ALLOW_NETWORKS")
                        .map(|list| {
                            Networks::parse(&list).map_err(|message| ConfigError::Invalid {
                                name: "CLOUDBRAIN_WEBHOOK_ALLOW_NETWORKS",
                                message,
                            })
                        })
                        .transpose()?
                        .unwrap_or_default(),
                    timeout: parse_seconds(&get, "CLOUDBRAIN_WEBHOOK_TIMEOUT", d.timeout)?,
                    retry_for: parse_seconds(&get, "CLOUDBRAIN_WEBHOOK_RETRY_FOR", d.retry_for)?,
                    backoff_base: parse_seconds(
                        &get,
                        "CLOUDBRAIN_WEBHOOK_BACKOFF_BASE",
                        d.backoff_base,
                    )?,
                    backoff_max: d.backoff_max,
                }
            },
            workers: {
                let d = WorkerSettings::default();
                WorkerSettings {
                    concurrency: parse_number(
                        &get,
                        "CLOUDBRAIN_WORKER_CONCURRENCY",
                        d.concurrency,
                    )?,
                    lease: parse_seconds(&get, "CLOUDBRAIN_JOB_LEASE", d.lease)?,
                    poll_interval: parse_seconds(
                        &get,
                        "CLOUDBRAIN_WORKER_POLL_INTERVAL",
                        d.poll_interval,
                    )?,
                    max_attempts: parse_number(
                        &get,
                        "CLOUDBRAIN_JOB_MAX_ATTEMPTS",
                        d.max_attempts as usize,
                    )?
                    .min(i32::MAX as usize) as i32,
                    backoff_base: parse_seconds(
                        &get,
                        "CLOUDBRAIN_JOB_BACKOFF_BASE",
                        d.backoff_base,
                    )?,
                    backoff_max: parse_seconds(&get, "CLOUDBRAIN_JOB_BACKOFF_MAX", d.backoff_max)?,
                    refresh_interval: parse_seconds(
                        &get,
                        "CLOUDBRAIN_REFRESH_INTERVAL",
                        d.refresh_interval,
                    )?,
                    launch_timeout: parse_seconds(
                        &get,
                        "CLOUDBRAIN_LAUNCH_TIMEOUT",
                        d.launch_timeout,
                    )?,
                    orphan_grace: parse_seconds(&get, "CLOUDBRAIN_ORPHAN_GRACE", d.orphan_grace)?,
                }
            },
        })
    }

    /// Where sessions that must stay on one server connection go: LISTEN, advisory locks,
    /// migrations and the CLI's one-off commands. `CLOUDBRAIN_DIRECT_DATABASE_URL` when
    /// set, else `DATABASE_URL`.
    pub fn direct_database_url(&self) -> &str {
        self.direct_database_url
            .as_deref()
            .unwrap_or(&self.database_url)
    }

    /// True when `DATABASE_URL` goes through a transaction-mode pooler: when
    /// `CLOUDBRAIN_DIRECT_DATABASE_URL` is set.
    pub fn behind_transaction_pooler(&self) -> bool {
        self.direct_database_url.is_some()
    }

    /// The key that seals provider configs, or a clear error when it is not set.
    pub fn require_encryption_key(&self) -> Result<&SecretKey, ConfigError> {
        self.encryption_key
            .as_ref()
            .ok_or(ConfigError::Missing("CLOUDBRAIN_DATABASE_ENCRYPTION_KEY"))
    }
}

/// Accepts `host:port`, and Go's `:port` (all interfaces) as Cloud Brain did.
fn parse_addr(name: &'static str, addr: &str) -> Result<SocketAddr, ConfigError> {
    let full = if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_owned()
    };
    full.parse()
        .map_err(|_not_an_address| ConfigError::Invalid {
            name,
            message: format!("{addr:?} is not an address like 127.0.0.1:42191"),
        })
}

fn parse_number(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: usize,
) -> Result<usize, ConfigError> {
    Ok(parse_optional_number(get, name)?.unwrap_or(default))
}

/// Reads a positive whole number; `None` when the setting is absent.
fn parse_optional_number(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<usize>, ConfigError> {
    get(name)
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ConfigError::Invalid {
                    name,
                    message: format!("{v:?} is not a positive whole number"),
                })
        })
        .transpose()
}

/// Reads a duration in seconds (fractions allowed, e.g. `0.5`).
fn parse_seconds(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match get(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| ConfigError::Invalid {
                name,
                message: format!("{v:?} is not a number of seconds"),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    #[test]
    fn address_falls_back_from_addr_to_port_to_cloud_brain_default() {
        let db = ("DATABASE_URL", "postgres://x");
        assert_eq!(config(&[db]).unwrap().addr.to_string(), "127.0.0.1:42191");
        assert_eq!(
            config(&[db, ("PORT", "8080")]).unwrap().addr.to_string(),
            "0.0.0.0:8080"
        );
        let both = config(&[db, ("PORT", "8080"), ("CLOUDBRAIN_ADDR", ":9000")]).unwrap();
        assert_eq!(both.addr.to_string(), "0.0.0.0:9000");
    }

    #[test]
    fn trusted_proxies_match_addresses_and_networks() {
        let trusted = Networks::parse("10.0.0.0/8, 192.168.1.7, ::1, fd00::/8").unwrap();
        for yes in [
            "10.1.2.3",
            "192.168.1.7",
            "::1",
            "fd12::1",
            "::ffff:10.9.9.9",
        ] {
            assert!(trusted.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in ["11.0.0.1", "192.168.1.8", "::2", "fe80::1", "127.0.0.1"] {
            assert!(!trusted.contains(no.parse().unwrap()), "{no}");
        }
        assert!(Networks::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Networks::parse("10.0.0.0/33").is_err());
        assert!(Networks::parse("proxy.internal").is_err());
    }

    #[test]
    fn malformed_settings_name_the_variable() {
        let err = config(&[
            ("DATABASE_URL", "x"),
            ("CLOUDBRAIN_DATABASE_ENCRYPTION_KEY", "abc"),
        ])
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("CLOUDBRAIN_DATABASE_ENCRYPTION_KEY"),
            "{err}"
        );
        let err = config(&[("DATABASE_URL", "x"), ("PORT", "http")]).unwrap_err();
        assert!(err.to_string().contains("PORT"), "{err}");
        let err = config(&[]).unwrap_err();
        assert_eq!(err.to_string(), "DATABASE_URL is not set");
    }

    #[test]
    fn the_pool_size_is_the_roles_own_unless_set() {
        let db = ("DATABASE_URL", "postgres://x");
        assert_eq!(config(&[db]).unwrap().pool_size, None);
        let set = config(&[db, ("CLOUDBRAIN_DATABASE_POOL_SIZE", "5")]).unwrap();
        assert_eq!(set.pool_size, Some(5));
        for bad in ["0", "-1", "many"] {
            let refused = config(&[db, ("CLOUDBRAIN_DATABASE_POOL_SIZE", bad)]);
            assert!(refused.is_err(), "{bad}");
        }
    }

    #[test]
    fn a_direct_url_sends_sessions_around_the_pooler() {
        let pooled = ("DATABASE_URL", "postgres://pgbouncer:6432/cb");
        let alone = config(&[pooled]).unwrap();
        assert_eq!(alone.direct_database_url(), "postgres://pgbouncer:6432/cb");
        assert!(!alone.behind_transaction_pooler());
        let direct = (
            "CLOUDBRAIN_DIRECT_DATABASE_URL",
            "postgres://primary:5432/cb",
        );
        let behind = config(&[pooled, direct]).unwrap();
        assert_eq!(behind.direct_database_url(), "postgres://primary:5432/cb");
        assert_eq!(behind.database_url, "postgres://pgbouncer:6432/cb");
        assert!(behind.behind_transaction_pooler());
    }

    #[test]
    fn instances_live_three_hours_unless_told_and_zero_means_until_given_back() {
        let db = ("DATABASE_URL", "x");
        let lifetime = |vars: &[(&str, &str)]| config(vars).unwrap().max_lifetime;
        assert_eq!(lifetime(&[db]), Some(Duration::from_secs(10_800)));
        let day = [db, ("CLOUDBRAIN_DEFAULT_MAX_LIFETIME", "86400")];
        assert_eq!(lifetime(&day), Some(Duration::from_secs(86_400)));
        assert_eq!(
            lifetime(&[db, ("CLOUDBRAIN_DEFAULT_MAX_LIFETIME", "0")]),
            None
        );
        let err = config(&[db, ("CLOUDBRAIN_DEFAULT_MAX_LIFETIME", "3h")]).unwrap_err();
        assert!(err.to_string().contains("CLOUDBRAIN_DEFAULT_MAX_LIFETIME"));
    }
}
