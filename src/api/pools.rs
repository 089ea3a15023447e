//! The pools routes: read pools and their counts (any token); write, scale and delete
//! them (admin tokens).

use actix_web::{web, HttpRequest, HttpResponse};

use super::body::read_json;
use super::error::ApiError;
use super::openapi::{AdminRefusals, BodyRefusals, TokenRefusals};
use super::wire::{ErrorBody, PoolBody, PoolList, PoolSpecBody, ScaleBody};
use super::AppState;
use crate::auth::Caller;

/// Every pool with its counts.
#[utoipa::path(
    get, path = "/pools", tag = "pools",
    responses(
        (status = 200, body = PoolList),
        TokenRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn list_pools(
    state: web::Data<AppState>,
    _caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let pools = state.broker.pools().await?;
    Ok(HttpResponse::Ok().json(PoolList {
        pools: pools.into_iter().map(PoolBody::from).collect(),
    }))
}

/// One pool with its counts and latest errors.
#[utoipa::path(
    get, path = "/pools/{name}", tag = "pools",
    params(("name" = String, Path, description = "Pool name")),
    responses(
        (status = 200, body = PoolBody),
        (status = 404, body = ErrorBody),
        TokenRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn get_pool(
    state: web::Data<AppState>,
    _caller: Caller,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let pool = state.broker.pool(&name).await?;
    Ok(HttpResponse::Ok().json(PoolBody::from(pool)))
}

/// Makes a pool or changes its shape and size (admin).
#[utoipa::path(
    put, path = "/pools/{name}", tag = "pools",
    params(("name" = String, Path, description = "Pool name: a letter or digit, then up to 62 letters, digits, '.', '_' or '-'")),
    request_body = PoolSpecBody,
    responses(
        (status = 200, body = PoolBody),
        (status = 422, description = "A field breaks a rule", body = ErrorBody),
        TokenRefusals, AdminRefusals, BodyRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn put_pool(
    state: web::Data<AppState>,
    caller: Caller,
    name: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let spec: PoolSpecBody = read_json(&req, payload, state.body_timeout).await?;
    let pool = state.broker.put_pool(caller, &name, spec.into()).await?;
    Ok(HttpResponse::Ok().json(PoolBody::from(pool)))
}

/// Sets how many idle machines a pool keeps (admin), as Barcelona's scale.
#[utoipa::path(
    post, path = "/pools/{name}/scale", tag = "pools",
    params(("name" = String, Path, description = "Pool name")),
    request_body = ScaleBody,
    responses(
        (status = 200, body = PoolBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "min_idle above max_size", body = ErrorBody),
        TokenRefusals, AdminRefusals, BodyRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn scale_pool(
    state: web::Data<AppState>,
    caller: Caller,
    name: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let scale: ScaleBody = read_json(&req, payload, state.body_timeout).await?;
    let pool = state
        .broker
        .scale_pool(caller, &name, scale.min_idle)
        .await?;
    Ok(HttpResponse::Ok().json(PoolBody::from(pool)))
}

/// Removes a pool (admin): its idle machines are destroyed, busy ones stay with their
/// clients. The body is the pool as it was.
#[utoipa::path(
    delete, path = "/pools/{name}", tag = "pools",
    params(("name" = String, Path, description = "Pool name")),
    responses(
        (status = 200, body = PoolBody),
        (status = 404, body = ErrorBody),
        TokenRefusals, AdminRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn delete_pool(
    state: web::Data<AppState>,
    caller: Caller,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let pool = state.broker.delete_pool(caller, &name).await?;
    Ok(HttpResponse::Ok().json(PoolBody::from(pool)))
}
