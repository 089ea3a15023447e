//! Tokens: their format, Cloud Brain's scrypt hash, the `auth_tokens` store and the
//! verifier that authenticates requests with a cache, a throttle and revocation by NOTIFY.

pub mod store;
pub mod token;
pub mod verifier;

pub use token::Token;
pub use verifier::{AuthError, TokenVerifier};

use serde::Serialize;

/// What a token may do: a client sees its own instances, an admin sees every instance.
/// Stored by name in `auth_tokens.scope`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    clap::ValueEnum,
    diesel::expression::AsExpression,
    diesel::deserialize::FromSqlRow,
)]
#[diesel(sql_type = diesel::sql_types::Text)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Sees and manages only the instances it asked for.
    Client,
    /// Sees and manages every instance.
    Admin,
}

impl Scope {
    /// The value stored in `auth_tokens.scope`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Client => "client",
            Scope::Admin => "admin",
        }
    }

    /// Reads a scope's name; `None` for anything else.
    pub fn parse(value: &str) -> Option<Self> {
        [Scope::Client, Scope::Admin]
            .into_iter()
            .find(|s| s.as_str() == value)
    }
}

crate::text_column!(Scope);

/// The authenticated caller of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The token's row id.
    pub token_id: i32,
    /// What the token may do.
    pub scope: Scope,
}
