//! The webhook routes (admin): subscriptions to instance events, their deliveries, and
//! sending one again. Deliveries are made by `workers::webhooks`.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::body::read_json;
use super::error::ApiError;
use super::openapi::{AdminRefusals, BodyRefusals, TokenRefusals};
use super::wire::{
    DeliveryBody, DeliveryList, ErrorBody, NewWebhookBody, WebhookBody, WebhookList,
};
use super::AppState;
use crate::auth::Caller;

/// The most deliveries one page shows.
const MAX_DELIVERIES: i64 = 1000;

/// Registers a subscription to instance events (admin).
#[utoipa::path(
    post, path = "/webhooks", tag = "webhooks",
    request_body = NewWebhookBody,
    responses(
        (status = 201, body = WebhookBody),
        (status = 404, description = "The filter's instance does not exist", body = ErrorBody),
        (status = 422, description = "A field breaks a rule (an address deliveries may not reach, a short secret, …)", body = ErrorBody),
        TokenRefusals, AdminRefusals, BodyRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn add_webhook(
    state: web::Data<AppState>,
    caller: Caller,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: NewWebhookBody = read_json(&req, payload, state.body_timeout).await?;
    let webhook = (state.broker)
        .add_webhook(caller, body.into(), &state.webhook_networks)
        .await?;
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/webhooks/{}", webhook.id)))
        .json(WebhookBody::from(webhook)))
}

/// Every subscription (admin).
#[utoipa::path(
    get, path = "/webhooks", tag = "webhooks",
    responses((status = 200, body = WebhookList), TokenRefusals, AdminRefusals),
    security(("token" = []), ("basic" = []))
)]
pub async fn list_webhooks(
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let webhooks = state.broker.webhooks(caller).await?;
    Ok(HttpResponse::Ok().json(WebhookList {
        webhooks: webhooks.into_iter().map(WebhookBody::from).collect(),
    }))
}

/// Deletes a subscription (admin); its pending deliveries are not sent.
#[utoipa::path(
    delete, path = "/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id")),
    responses(
        (status = 200, description = "The subscription as it was", body = WebhookBody),
        (status = 404, body = ErrorBody),
        TokenRefusals, AdminRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn delete_webhook(
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let webhook = state.broker.delete_webhook(caller, &id).await?;
    Ok(HttpResponse::Ok().json(WebhookBody::from(webhook)))
}

/// `GET /webhooks/<id>/deliveries` parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct DeliveryParams {
    /// How many, newest first: 1 to 1000 (default 100).
    pub limit: Option<i64>,
}

/// A subscription's latest deliveries (admin), newest first.
#[utoipa::path(
    get, path = "/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id"), DeliveryParams),
    responses(
        (status = 200, body = DeliveryList),
        (status = 400, description = "A malformed query string", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "A limit out of range", body = ErrorBody),
        TokenRefusals, AdminRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn list_deliveries(
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
    query: web::Query<DeliveryParams>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_DELIVERIES).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be between 1 and {MAX_DELIVERIES}"),
        ));
    }
    let deliveries = state.broker.deliveries(caller, &id, limit).await?;
    Ok(HttpResponse::Ok().json(DeliveryList {
        deliveries: deliveries.into_iter().map(DeliveryBody::from).collect(),
    }))
}

/// Sends a delivery again from the start (admin): pending, due now, its attempts and
/// retry period begun anew.
#[utoipa::path(
    post, path = "/webhooks/{id}/deliveries/{delivery}/redeliver", tag = "webhooks",
    params(
        ("id" = String, Path, description = "Webhook id"),
        ("delivery" = String, Path, description = "Delivery id"),
    ),
    responses(
        (status = 200, body = DeliveryBody),
        (status = 404, body = ErrorBody),
        TokenRefusals, AdminRefusals,
    ),
    security(("token" = []), ("basic" = []))
)]
pub async fn redeliver(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, delivery) = path.into_inner();
    let again = state.broker.redeliver(caller, &id, &delivery).await?;
    Ok(HttpResponse::Ok().json(DeliveryBody::from(again)))
}
