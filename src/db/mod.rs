//! The database: diesel schema and models, the connection pool and the migrations runner.

pub mod listen;
pub mod models;
pub mod schema;

use anyhow::Context;
use diesel::sql_types::BigInt;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

/// A pool of async Postgres connections.
pub type Pool = deadpool::Pool<AsyncPgConnection>;

/// A connection borrowed from the [`Pool`].
pub type PooledConnection = deadpool::Object<AsyncPgConnection>;

/// Every migration in `migrations/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Advisory lock key held while migrating, so two processes never migrate at once.
const MIGRATION_LOCK_KEY: i64 = 0x636c_6f75_6462_7201;

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

/// Builds a connection pool of at most `size` connections; connects lazily.
pub fn pool(database_url: &str, size: usize) -> anyhow::Result<Pool> {
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(database_url);
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
    let mut conn = AsyncPgConnection::establish(database_url)
        .await
        .context("connecting to the database")?;
    diesel::sql_query("SELECT pg_advisory_lock($1)")
        .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
        .execute(&mut conn)
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
    diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
        .execute(&mut conn)
        .await
        .context("releasing the migration lock")?;
    applied
}
