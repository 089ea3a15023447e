//! Tokens: their format, Cloud Brain's scrypt hash, the `auth_tokens` store and the
//! verifier that authenticates requests with a cache, a throttle and revocation by NOTIFY.

pub mod store;
pub mod token;
pub mod verifier;

pub use token::Token;
pub use verifier::{AuthError, TokenVerifier};

use serde::Serialize;

crate::text_enum! {
    /// What a token may do: a client sees its own instances, an admin sees every instance.
    /// Stored by name in `auth_tokens.scope`.
    #[derive(Serialize, clap::ValueEnum)]
    #[serde(rename_all = "lowercase")]
    pub enum Scope {
        /// Sees and manages only the instances it asked for.
        Client => "client",
        /// Sees and manages every instance.
        Admin => "admin",
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The token's row id.
    pub token_id: crate::ids::TokenId,
    /// What the token may do.
    pub scope: Scope,
}
