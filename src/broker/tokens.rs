//! Tokens as admins manage them over HTTP: listed (never a secret, salt or hash) and
//! revoked. Making one stays an operator's command (`cloudbrain create-token`): its
//! secret is printed once, to whoever runs it.

use super::{admin_only, numeric_id, shown_id, Broker, BrokerError};
use crate::auth::store::{self, Revoked, TokenSummary};
use crate::auth::Caller;
use crate::ids::TokenId;

impl Broker {
    /// Every token, oldest first (admin).
    pub async fn tokens(&self, caller: Caller) -> Result<Vec<TokenSummary>, BrokerError> {
        admin_only(caller, "manage tokens")?;
        let mut conn = self.conn().await?;
        Ok(store::list_tokens(&mut conn).await?)
    }

    /// Revokes token `id` (admin), as `cloudbrain revoke-token` does: every `http` process
    /// refuses it within a second. Revoking a revoked token changes nothing and answers
    /// the same.
    pub async fn revoke_token(
        &self,
        caller: Caller,
        id: &str,
    ) -> Result<TokenSummary, BrokerError> {
        admin_only(caller, "manage tokens")?;
        let no_such = || BrokerError::NoSuchToken(shown_id(id));
        let id = TokenId(numeric_id(id).ok_or_else(no_such)?);
        let mut conn = self.conn().await?;
        match store::revoke_token(&mut conn, id).await? {
            Revoked::NoSuchToken => Err(no_such()),
            Revoked::Now | Revoked::Already => store::token_summary(&mut conn, id)
                .await?
                .ok_or_else(no_such),
        }
    }
}
