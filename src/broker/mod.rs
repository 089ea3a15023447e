//! The business rules: who may see which instance, what a request must contain, which
//! transition is allowed and what gets enqueued with it. The HTTP API and the workers are
//! two front ends of this module.

pub mod fleet;
mod for_workers;
pub mod instances;
pub mod lifecycle;
pub mod model;
pub mod offerings;
pub mod pools;
pub mod providers;
pub mod state;
pub mod stream;
pub mod tokens;
pub mod validate;
pub mod webhooks;

pub use for_workers::ClaimedRows;
pub use instances::{CreateInstance, InstanceFilter, InstancePage};
pub use state::State;

use crate::crypto::SecretKey;
use crate::db::{Pool, PooledConnection};

/// Why the broker refused or could not carry out a request.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The request is well-formed but breaks a rule; `field` names the culprit.
    #[error("{field}: {message}")]
    Invalid {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The `Idempotency-Key` was used before for a different request.
    #[error("Idempotency-Key was already used with a different request body")]
    IdempotencyConflict,
    /// No such instance, or not one the caller may see.
    #[error("instance not found")]
    NotFound,
    /// The pool has `max_size` live instances already.
    #[error(
        "pool {pool:?} is at its max_size of {max_size}; try again when a machine is given back"
    )]
    PoolFull {
        /// The pool's name.
        pool: String,
        /// Its bound.
        max_size: u32,
    },
    /// No pool has this name.
    #[error("pool {0:?} does not exist")]
    NoSuchPool(String),
    /// No webhook (or delivery of it) has this id.
    #[error("webhook {0} does not exist")]
    NoSuchWebhook(String),
    /// No token has this id.
    #[error("token {0} does not exist")]
    NoSuchToken(String),
    /// The caller's token may not do this; the message says who may.
    #[error("{0}")]
    Forbidden(String),
    /// The database cannot be reached.
    #[error("database unavailable")]
    Unavailable,
    /// The database lacks migrations this binary needs.
    #[error("the database is not migrated ({0} migration(s) pending): run `cloudbrain migrate`")]
    NotMigrated(usize),
    /// Anything unexpected; logged once where it is turned into a response.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl BrokerError {
    /// A rule broken by the request field `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        BrokerError::Invalid {
            field,
            message: message.into(),
        }
    }
}

impl BrokerError {
    /// This error for one of the requests that share it (a batched read's): the same
    /// error where it carries nothing but its kind, else an internal one that says what
    /// it was.
    pub fn shared(&self) -> BrokerError {
        match self {
            BrokerError::Unavailable => BrokerError::Unavailable,
            BrokerError::NotMigrated(pending) => BrokerError::NotMigrated(*pending),
            BrokerError::NotFound => BrokerError::NotFound,
            other => BrokerError::Internal(anyhow::anyhow!("{other:#}")),
        }
    }
}

impl From<diesel::result::Error> for BrokerError {
    fn from(err: diesel::result::Error) -> Self {
        match err {
            diesel::result::Error::NotFound => BrokerError::NotFound,
            other if crate::db::is_unavailable(&other) => {
                tracing::warn!(error = %other, "database unavailable");
                BrokerError::Unavailable
            }
            other if crate::db::statement_lost_by_pooler(&other) => {
                tracing::error!(
                    error = %other,
                    "DATABASE_URL goes through a transaction-mode pooler: set \
                     CLOUDBRAIN_DIRECT_DATABASE_URL to Postgres itself (docs/deploy.md)"
                );
                BrokerError::Unavailable
            }
            other => BrokerError::Internal(anyhow::Error::new(other).context("database query")),
        }
    }
}

/// The id a path names, when it is digits only and fits `T` (a sign, spaces or a leading
/// `+` name nothing).
fn numeric_id<T: std::str::FromStr>(text: &str) -> Option<T> {
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
}

/// As much of an id that names nothing as an error message repeats.
fn shown_id(text: &str) -> String {
    text.chars().take(40).collect()
}

/// A connection from `pool`, or [`BrokerError::Unavailable`].
async fn conn(pool: &Pool) -> Result<PooledConnection, BrokerError> {
    pool.get().await.map_err(|error| {
        tracing::warn!(%error, "no database connection");
        BrokerError::Unavailable
    })
}

/// Refuses a caller that is not an admin: only an admin token may `what`.
fn admin_only(caller: crate::auth::Caller, what: &str) -> Result<(), BrokerError> {
    if caller.scope == crate::auth::Scope::Admin {
        Ok(())
    } else {
        Err(BrokerError::Forbidden(format!(
            "only an admin token may {what}"
        )))
    }
}

/// The channels a write of events and jobs wakes: the event stream's and the job workers'.
pub const ANNOUNCED: &[&str] = &[stream::EVENTS_CHANNEL, crate::queue::JOBS_CHANNEL];

/// The broker: the rules, over a connection pool.
#[derive(Clone)]
pub struct Broker {
    pool: Pool,
    /// Wakes listeners once writes have committed ([`Broker::announce`]).
    announcer: crate::db::Announcer,
    key: SecretKey,
    max_lifetime: Option<std::time::Duration>,
    /// What requests that name no pool go by, as this process last read it; shared by
    /// every clone.
    offers: std::sync::Arc<providers::OfferCache>,
    /// `GET /instances/<id>`'s reads, batched over this broker's pool.
    instance_reads: std::sync::Arc<instances::InstanceReads>,
}

impl Broker {
    /// A broker over `pool`, opening provider configs with `key`, giving instances at most
    /// [`crate::config::DEFAULT_MAX_LIFETIME`].
    pub fn new(pool: Pool, key: SecretKey) -> Self {
        Self {
            announcer: crate::db::Announcer::new(pool.clone()),
            instance_reads: std::sync::Arc::new(instances::instance_reads(pool.clone())),
            pool,
            key,
            max_lifetime: Some(crate::config::DEFAULT_MAX_LIFETIME),
            offers: Default::default(),
        }
    }

    /// Wakes the listeners of what a committed write made: the event stream's always, the
    /// job workers' when it enqueued a job. Every write of events and jobs through the
    /// broker calls it after its commit; none sends NOTIFY itself (see
    /// [`crate::db::announce`]).
    fn announce(&self, jobs: bool) {
        if jobs {
            self.announcer.announce(ANNOUNCED);
        } else {
            self.announcer.announce(&[stream::EVENTS_CHANNEL]);
        }
    }

    /// The same broker giving instances at most `max_lifetime`, and that when a request
    /// asks for no lifetime (`None`: instances live until given back).
    pub fn with_max_lifetime(mut self, max_lifetime: Option<std::time::Duration>) -> Self {
        self.max_lifetime = max_lifetime;
        self
    }

    /// The same broker over `pool`, with an announcer of its own: for a thread that should
    /// use connections of its own (an API worker thread).
    pub fn with_pool(mut self, pool: Pool) -> Self {
        self.announcer = crate::db::Announcer::new(pool.clone());
        self.instance_reads = std::sync::Arc::new(instances::instance_reads(pool.clone()));
        self.pool = pool;
        self
    }

    /// The longest an instance lives, and how long when its request does not say.
    pub fn max_lifetime(&self) -> Option<std::time::Duration> {
        self.max_lifetime
    }

    async fn conn(&self) -> Result<PooledConnection, BrokerError> {
        conn(&self.pool).await
    }

    /// Checks that the database answers and has every migration this binary knows;
    /// the error says what is wrong.
    pub async fn ping(&self) -> Result<(), BrokerError> {
        let mut conn = self.conn().await?;
        let pending = crate::db::pending_migrations(&mut conn).await?;
        if !pending.is_empty() {
            return Err(BrokerError::NotMigrated(pending.len()));
        }
        Ok(())
    }
}
