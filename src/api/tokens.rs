//! The token routes (admin): list tokens and revoke one. Tokens are made by
//! `cloudbrain create-token`, whose output is the only place a secret appears.

use actix_web::{web, HttpResponse};

use super::error::ApiError;
use super::openapi::{AdminRefusals, TokenRefusals};
use super::wire::{ErrorBody, TokenBody, TokenList};
use super::AppState;
use crate::auth::Caller;

/// Every token, oldest first (admin).
#[utoipa::path(
    get, path = "/tokens", tag = "tokens",
    responses((status = 200, body = TokenList), TokenRefusals, AdminRefusals),
    security(("token" = []), ("basic" = []))
)]
pub async fn list_tokens(
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let tokens = state.broker.tokens(caller).await?;
    Ok(HttpResponse::Ok().json(TokenList {
        tokens: tokens.into_iter().map(TokenBody::from).collect(),
    }))
}

/// Revokes a token (admin): every http process refuses it within a second. Revoking a
/// revoked token answers the same and changes nothing.
#[utoipa::path(
    delete, path = "/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "The token's id (the part before the dash)")),
    responses(
        (status = 200, description = "The token, revoked", body = TokenBody),
        (status = 404, body = ErrorBody),
        TokenRefusals, AdminRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn revoke_token(
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let token = state.broker.revoke_token(caller, &id).await?;
    Ok(HttpResponse::Ok().json(TokenBody::from(token)))
}
