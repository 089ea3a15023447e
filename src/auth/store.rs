//! The `auth_tokens` table: make, list, find, revoke and touch tokens.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use super::token::{generate_secret, Token};
use super::Scope;
use crate::db::schema::auth_tokens;
use crate::ids::TokenId;

/// A row of `auth_tokens`.
#[derive(Debug, Clone, Queryable, Selectable, Identifiable)]
#[diesel(table_name = auth_tokens, check_for_backend(diesel::pg::Pg))]
pub struct AuthToken {
    /// The `<id>` part of a token.
    pub id: crate::ids::TokenId,
    /// What the operator said the token is for.
    pub description: String,
    /// The 32-byte scrypt salt.
    pub token_salt: Vec<u8>,
    /// scrypt of the 16 secret bytes.
    pub token_hash: Vec<u8>,
    /// What the token may do.
    pub scope: super::Scope,
    /// When the token was made.
    pub created_at: DateTime<Utc>,
    /// When the token last authenticated a request (to the minute).
    pub last_used_at: Option<DateTime<Utc>>,
    /// When the token was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A new row of `auth_tokens`.
#[derive(Debug, Insertable)]
#[diesel(table_name = auth_tokens)]
pub struct NewAuthToken<'a> {
    /// What the operator said the token is for.
    pub description: &'a str,
    /// The 32-byte scrypt salt.
    pub token_salt: &'a [u8],
    /// scrypt of the 16 secret bytes.
    pub token_hash: &'a [u8],
    /// What the token may do.
    pub scope: super::Scope,
}

/// The channel on which a revocation is announced to every `http` process.
pub const REVOKED_CHANNEL: &str = "cloudbrain_token_revoked";

/// Makes a token, stores its hash, and returns the token (the only time its secret exists).
pub async fn create_token(
    conn: &mut AsyncPgConnection,
    description: &str,
    scope: Scope,
) -> QueryResult<Token> {
    let new = tokio::task::spawn_blocking(generate_secret)
        .await
        .map_err(|e| diesel::result::Error::QueryBuilderError(e.into()))?;
    let id: i32 = diesel::insert_into(auth_tokens::table)
        .values(NewAuthToken {
            description,
            token_salt: &new.salt,
            token_hash: &new.hash,
            scope,
        })
        .returning(auth_tokens::id)
        .get_result(conn)
        .await?;
    Ok(Token {
        id: TokenId(id),
        secret: new.secret,
    })
}

/// What `list-tokens` shows of a token: never its secret, salt or hash.
#[derive(Debug, Clone, Serialize, Queryable, Selectable)]
#[diesel(table_name = auth_tokens, check_for_backend(diesel::pg::Pg))]
pub struct TokenSummary {
    /// The `<id>` part of the token.
    pub id: i32,
    /// What it is for.
    pub description: String,
    /// `client` or `admin`.
    pub scope: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it was last used (to the minute).
    pub last_used_at: Option<DateTime<Utc>>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Every token, oldest first.
pub async fn list_tokens(conn: &mut AsyncPgConnection) -> QueryResult<Vec<TokenSummary>> {
    auth_tokens::table
        .select(TokenSummary::as_select())
        .order(auth_tokens::id)
        .load(conn)
        .await
}

/// What `list-tokens` shows of token `id`.
pub async fn token_summary(
    conn: &mut AsyncPgConnection,
    id: TokenId,
) -> QueryResult<Option<TokenSummary>> {
    auth_tokens::table
        .find(id)
        .select(TokenSummary::as_select())
        .first(conn)
        .await
        .optional()
}

/// Reads one token row.
pub async fn find_token(
    conn: &mut AsyncPgConnection,
    id: TokenId,
) -> QueryResult<Option<AuthToken>> {
    auth_tokens::table
        .find(id)
        .select(AuthToken::as_select())
        .first(conn)
        .await
        .optional()
}

/// What revoking did.
#[derive(Debug, PartialEq, Eq)]
pub enum Revoked {
    /// The token is revoked from now on.
    Now,
    /// It had been revoked before.
    Already,
    /// There is no such token.
    NoSuchToken,
}

/// Revokes a token and tells every running `http` process to forget it, in one transaction.
pub async fn revoke_token(conn: &mut AsyncPgConnection, id: TokenId) -> QueryResult<Revoked> {
    conn.transaction(async |conn| {
        let Some(token) = find_token(conn, id).await? else {
            return Ok(Revoked::NoSuchToken);
        };
        if token.revoked_at.is_none() {
            diesel::update(auth_tokens::table.find(id))
                .set(auth_tokens::revoked_at.eq(diesel::dsl::now))
                .execute(conn)
                .await?;
        }
        // Announce even a repeated revocation: it costs nothing and heals a missed one.
        diesel::sql_query("SELECT pg_notify($1, $2)")
            .bind::<Text, _>(REVOKED_CHANNEL)
            .bind::<Text, _>(id.to_string())
            .execute(conn)
            .await?;
        Ok(if token.revoked_at.is_none() {
            Revoked::Now
        } else {
            Revoked::Already
        })
    })
    .await
}

/// Records that a token was used, unless that was already recorded in the last minute
/// (by any process), so a busy token does not cost a write per request.
pub async fn touch_last_used(conn: &mut AsyncPgConnection, id: TokenId) -> QueryResult<()> {
    diesel::sql_query(
        "UPDATE auth_tokens SET last_used_at = now() \
         WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
    )
    .bind::<diesel::sql_types::Integer, _>(id)
    .execute(conn)
    .await?;
    Ok(())
}
