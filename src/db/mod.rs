//! The database: diesel schema and models, the connection pool and the migrations runner.

pub mod announce;
pub mod batch;
pub mod cached;
pub mod listen;
pub mod locks;
pub mod schema;

use anyhow::Context;
use diesel::QueryResult;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

pub use announce::Announcer;
pub use cached::{CacheStatement, Cached};

/// A small value stored in one column of SQL type `$sql`: copyable, comparable, and
/// usable in diesel queries and rows. `text_enum!` and `id_type!` declare through it.
#[macro_export]
macro_rules! column_value {
    ($sql:ty, $item:item) => {
        #[derive(
            Debug,
            Clone,
            Copy,
            PartialEq,
            Eq,
            diesel::expression::AsExpression,
            diesel::deserialize::FromSqlRow,
        )]
        #[diesel(sql_type = $sql)]
        $item
    };
}

/// Declares an enum whose values are stored by name in a `TEXT` column: the enum, `ALL`,
/// `as_str`, `parse`, and its diesel mapping. An unknown stored value is an error when
/// the row is loaded, never a guess.
///
/// ```ignore
/// text_enum! {
///     /// Where a job is.
///     pub enum JobStatus {
///         /// Waiting to run.
///         Queued => "queued",
///         /// Never to run again.
///         Dead => "dead",
///     }
/// }
/// ```
#[macro_export]
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident => $text:literal ),+ $(,)?
        }
    ) => {
        $crate::column_value! {
            diesel::sql_types::Text,
            $(#[$meta])*
            pub enum $name {
                $( $(#[$variant_meta])* $variant ),+
            }
        }

        impl $name {
            /// Every value, in the order declared.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name it is stored and shown under.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// Reads a name; `None` for anything else.
            pub fn parse(value: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == value)
            }
        }

        impl diesel::serialize::ToSql<diesel::sql_types::Text, diesel::pg::Pg> for $name {
            fn to_sql<'b>(
                &'b self,
                out: &mut diesel::serialize::Output<'b, '_, diesel::pg::Pg>,
            ) -> diesel::serialize::Result {
                <str as diesel::serialize::ToSql<diesel::sql_types::Text, diesel::pg::Pg>>::to_sql(
                    self.as_str(),
                    out,
                )
            }
        }

        impl diesel::deserialize::FromSql<diesel::sql_types::Text, diesel::pg::Pg> for $name {
            fn from_sql(value: diesel::pg::PgValue<'_>) -> diesel::deserialize::Result<Self> {
                let text = <String as diesel::deserialize::FromSql<
                    diesel::sql_types::Text,
                    diesel::pg::Pg,
                >>::from_sql(value)?;
                $name::parse(&text)
                    .ok_or_else(|| format!("{text:?} is not a {}", stringify!($name)).into())
            }
        }
    };
}

/// Declares an id: a newtype over the column's Rust type, written and read as that column,
/// shown as the bare value, so signatures say which id they take.
#[macro_export]
macro_rules! id_type {
    (
        $(#[$meta:meta])*
        pub struct $name:ident($inner:ty) as $sql:ty;
    ) => {
        $crate::column_value! {
            $sql,
            $(#[$meta])*
            #[derive(Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
            #[serde(transparent)]
            pub struct $name(pub $inner);
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl diesel::serialize::ToSql<$sql, diesel::pg::Pg> for $name {
            fn to_sql<'b>(
                &'b self,
                out: &mut diesel::serialize::Output<'b, '_, diesel::pg::Pg>,
            ) -> diesel::serialize::Result {
                <$inner as diesel::serialize::ToSql<$sql, diesel::pg::Pg>>::to_sql(&self.0, out)
            }
        }

        impl diesel::deserialize::FromSql<$sql, diesel::pg::Pg> for $name {
            fn from_sql(value: diesel::pg::PgValue<'_>) -> diesel::deserialize::Result<Self> {
                <$inner as diesel::deserialize::FromSql<$sql, diesel::pg::Pg>>::from_sql(value)
                    .map($name)
            }
        }
    };
}

/// A pool of async Postgres connections.
pub type Pool = deadpool::Pool<AsyncPgConnection>;

/// A connection borrowed from the [`Pool`].
pub type PooledConnection = deadpool::Object<AsyncPgConnection>;

/// Every migration in `migrations/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// True when `err` says the database went away, not that the query was wrong: the
/// connection closed or reset, the server shutting down (`terminating connection due to
/// administrator command`, 57P01) or crashing, or a commit whose outcome was lost with it.
/// Such a request may succeed when tried again, so callers answer 503, not 500.
pub fn is_unavailable(err: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    match err {
        Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
            _,
        ) => true,
        // diesel-async keeps the SQLSTATE to itself; the server's words for class 57
        // (operator intervention) and class 08 (connection exception) are stable.
        Error::DatabaseError(_, info) => {
            let message = info.message();
            [
                "terminating connection",
                "the database system is",
                "connection to server",
                "server closed the connection",
                "canceling statement due to conflict with recovery",
            ]
            .iter()
            .any(|start| message.starts_with(start))
        }
        Error::RollbackErrorOnCommit { commit_error, .. } => is_unavailable(commit_error),
        // A transaction whose connection broke leaves its manager in this state.
        Error::BrokenTransactionManager => true,
        _ => false,
    }
}

/// True when `err` says a named statement prepared on one server connection was missing
/// (or another's was found) on the next: the pool's connections go through a
/// transaction-mode pooler without `CLOUDBRAIN_DIRECT_DATABASE_URL` set, which makes the
/// pool send unnamed statements. Such a request fails for the setting, not for itself.
pub fn statement_lost_by_pooler(err: &diesel::result::Error) -> bool {
    match err {
        diesel::result::Error::DatabaseError(_, info) => {
            let message = info.message();
            message.starts_with("prepared statement \"")
                && (message.ends_with("does not exist") || message.ends_with("already exists"))
        }
        _ => false,
    }
}

/// Where `url` points, for messages: `host:port/database`, never the user or password.
pub fn describe(url: &str) -> String {
    let Some((_, rest)) = url.split_once("://") else {
        return "the database DATABASE_URL names".to_owned();
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let (host, database) = rest.split_once('/').unwrap_or((rest, ""));
    let host = if host.is_empty() { "localhost" } else { host };
    let host = if host.contains(':') && !host.ends_with(']') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    format!("{host}/{database}")
}

/// Opens one connection, naming where and why when it cannot.
pub async fn connect(url: &str) -> anyhow::Result<AsyncPgConnection> {
    match AsyncPgConnection::establish(url).await {
        Ok(conn) => Ok(conn),
        Err(error) => {
            let place = describe(url);
            // The driver's error says only "error connecting to server"; the socket says why.
            let host = place.split('/').next().unwrap_or_default().to_owned();
            let why = match tokio::time::timeout(
                std::time::Duration::from_secs(3),
                tokio::net::TcpStream::connect(&host),
            )
            .await
            {
                Ok(Err(io)) => io.to_string(),
                Err(_) => "no answer within 3 s".to_owned(),
                Ok(Ok(_)) => error.to_string(),
            };
            anyhow::bail!("cannot reach the database at {place} (DATABASE_URL): {why}")
        }
    }
}

/// The versions of the migrations built into this binary that the database lacks.
pub async fn pending_migrations(conn: &mut AsyncPgConnection) -> QueryResult<Vec<String>> {
    use diesel::migration::MigrationSource;
    #[derive(diesel::QueryableByName)]
    struct Applied {
        #[diesel(sql_type = diesel::sql_types::Text)]
        version: String,
    }
    let tracked: Vec<Applied> = diesel::sql_query("SELECT version FROM __diesel_schema_migrations")
        .load(conn)
        .await
        .or_else(|err| match err {
            // No table yet: nothing was ever applied.
            diesel::result::Error::DatabaseError(_, ref info)
                if info.message().contains("__diesel_schema_migrations") =>
            {
                Ok(Vec::new())
            }
            other => Err(other),
        })?;
    let embedded: Vec<Box<dyn diesel::migration::Migration<diesel::pg::Pg>>> =
        MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS).map_err(|e| {
            diesel::result::Error::QueryBuilderError(format!("reading migrations: {e}").into())
        })?;
    Ok(embedded
        .iter()
        .map(|m| m.name().version().to_string())
        .filter(|v| !tracked.iter().any(|t| &t.version == v))
        .collect())
}

/// Fails, saying what to run, when the database at `url` lacks migrations this binary has.
pub async fn require_migrated(url: &str) -> anyhow::Result<()> {
    connect_migrated(url).await.map(drop)
}

/// Opens one connection to a database that has every migration this binary has; fails,
/// saying what to run, when it lacks some.
pub async fn connect_migrated(url: &str) -> anyhow::Result<AsyncPgConnection> {
    let mut conn = connect(url).await?;
    let pending = pending_migrations(&mut conn).await?;
    if !pending.is_empty() {
        anyhow::bail!(
            "the database at {} is not migrated ({} migration(s) pending: {}): run `cloudbrain migrate`",
            describe(url),
            pending.len(),
            pending.join(", ")
        );
    }
    Ok(conn)
}

/// How the pool's connections send statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statements {
    /// Each statement prepared once per connection under a name and reused: the fastest,
    /// for a pool connected straight to Postgres.
    Prepared,
    /// Each statement sent unnamed, parsed, bound and run in one message batch, with no
    /// statement cache: for a pool behind a transaction-mode pooler (PgBouncer), where
    /// consecutive statements of one client may run on different server connections and a
    /// named statement prepared on one is unknown to the next.
    Unnamed,
}

/// What a pool is made of, for a part that makes pools of its own (the API, one per
/// worker thread).
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Where it connects.
    pub url: String,
    /// Its largest number of connections.
    pub size: usize,
    /// How it sends statements.
    pub statements: Statements,
}

impl PoolSettings {
    /// A pool of these settings ([`pool`]).
    pub fn build(&self) -> anyhow::Result<Pool> {
        pool(&self.url, self.size, self.statements)
    }
}

/// Builds a connection pool of at most `size` connections; connects lazily.
pub fn pool(database_url: &str, size: usize, statements: Statements) -> anyhow::Result<Pool> {
    // No test query at each checkout (it was a round trip before every use): a connection
    // whose server closed it is dropped by deadpool's recycle check (`is_closed`), and one
    // lost silently fails its first query, which answers 503 (`is_unavailable`).
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    if statements == Statements::Unnamed {
        config.custom_setup = Box::new(|url| {
            Box::pin(async move {
                let mut conn = AsyncPgConnection::establish(url).await?;
                // diesel-async (vendor/diesel-async) sends statements unnamed when its
                // statement cache is off.
                conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
                Ok(conn)
            })
        });
    }
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(database_url, config);
    deadpool::Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(std::time::Duration::from_secs(5)))
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .runtime(::deadpool::Runtime::Tokio1)
        .build()
        .context("building the database connection pool")
}

/// Applies every pending migration under an advisory lock and returns the versions applied.
pub async fn run_migrations(database_url: &str) -> anyhow::Result<Vec<String>> {
    let mut conn = connect(database_url).await?;
    locks::migrations(&mut conn, true)
        .await
        .context("taking the migration lock")?;
    // diesel's migration harness is synchronous: run it off the async executor.
    let (mut conn, applied) = tokio::task::spawn_blocking(move || {
        let mut wrapper = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
        let applied = wrapper
            .run_pending_migrations(MIGRATIONS)
            .map(|versions| versions.iter().map(|v| v.to_string()).collect::<Vec<_>>())
            .map_err(|e| anyhow::anyhow!("running migrations: {e}"));
        (wrapper.into_inner(), applied)
    })
    .await
    .context("migration task")?;
    locks::migrations(&mut conn, false)
        .await
        .context("releasing the migration lock")?;
    applied
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn descriptions_name_host_port_and_database_never_the_password() {
        assert_eq!(
            describe("postgres://cb:s3cret@db.internal:6432/cloudbrain?sslmode=require"),
            "db.internal:6432/cloudbrain"
        );
        assert_eq!(describe("postgres://db.internal/cb"), "db.internal:5432/cb");
        assert_eq!(describe("postgresql://u@[::1]:5433/x"), "[::1]:5433/x");
        assert!(!describe("host=x password=y").contains('y'));
    }
}
