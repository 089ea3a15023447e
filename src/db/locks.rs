//! Every advisory lock cloudbrain takes, named in one place, and a session to hold them in.
//!
//! The fake cloud's lock on creating its own schema is the one lock outside this list: its
//! crate cannot see this one (`cloudbrain_provider_fake::SCHEMA_LOCK`, a key neither of
//! these can take).

use diesel::sql_types::{BigInt, Bool, Integer, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

/// Held while migrating, so two processes never migrate at once.
pub const MIGRATIONS: i64 = 0x636c_6f75_6462_7201;

/// The class of the refresh locks: `(REFRESH, hashtext(name))` is held while one refresh
/// worker reconciles the provider config `name`.
pub const REFRESH: i32 = 1919;

/// The class of the claim leads: `(LEAD, hashtext(kinds))` is held by the one job runner
/// that claims jobs of those kinds as they come (`queue::runner`).
pub const LEAD: i32 = 1920;

#[derive(diesel::QueryableByName)]
struct Answer {
    #[diesel(sql_type = Bool)]
    done: bool,
}

/// Runs `SELECT <function>($1)` with the migration lock's key.
pub async fn migrations(conn: &mut AsyncPgConnection, lock: bool) -> diesel::QueryResult<()> {
    let sql = if lock {
        "SELECT pg_advisory_lock($1)"
    } else {
        "SELECT pg_advisory_unlock($1)"
    };
    diesel::sql_query(sql)
        .bind::<BigInt, _>(MIGRATIONS)
        .execute(conn)
        .await
        .map(|_| ())
}

/// A database session of its own, not the pool's, in which session-level locks live as
/// long as their holder wants them.
pub struct Session {
    database_url: String,
    conn: tokio::sync::Mutex<Option<AsyncPgConnection>>,
}

impl Session {
    /// A session on `database_url`, opened on first use.
    pub fn new(database_url: String) -> Self {
        Self {
            database_url,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Takes the refresh lock of provider config `name` unless another session holds it;
    /// true when taken.
    pub async fn try_lock_refresh(&self, name: &str) -> anyhow::Result<bool> {
        self.ask(
            "SELECT pg_try_advisory_lock($1, hashtext($2)) AS done",
            REFRESH,
            name,
        )
        .await
    }

    /// Lets go of the refresh lock of provider config `name`.
    pub async fn unlock_refresh(&self, name: &str) -> anyhow::Result<bool> {
        self.ask(
            "SELECT pg_advisory_unlock($1, hashtext($2)) AS done",
            REFRESH,
            name,
        )
        .await
    }

    /// True while this session holds the claim lead of `kinds`, taking it when no other
    /// session does. Asked again and again: a session that holds it already takes it no
    /// second time (advisory locks count), so one unlock, or the session's end, lets go.
    pub async fn try_lead(&self, kinds: &str) -> anyhow::Result<bool> {
        self.ask(
            "SELECT CASE WHEN EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' \
                AND granted AND pid = pg_backend_pid() AND classid = $1::oid \
                AND objid = hashtext($2)::oid AND objsubid = 2) THEN true \
             ELSE pg_try_advisory_lock($1, hashtext($2)) END AS done",
            LEAD,
            kinds,
        )
        .await
    }

    async fn ask(&self, sql: &str, class: i32, name: &str) -> anyhow::Result<bool> {
        let mut slot = self.conn.lock().await;
        let conn = match slot.as_mut() {
            Some(conn) => conn,
            None => slot.insert(AsyncPgConnection::establish(&self.database_url).await?),
        };
        match diesel::sql_query(sql)
            .bind::<Integer, _>(class)
            .bind::<Text, _>(name)
            .get_result::<Answer>(conn)
            .await
        {
            Ok(answer) => Ok(answer.done),
            Err(error) => {
                // The session (and any lock it held) is gone: start a new one next time.
                *slot = None;
                Err(error.into())
            }
        }
    }
}
