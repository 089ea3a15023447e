//! The `Caller` extractor: reads the token from `Authorization` and verifies it.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{web, FromRequest, HttpRequest};
use base64::Engine;

use super::error::ApiError;
use super::AppState;
use crate::auth::Caller;
use crate::config::Networks;
use std::net::IpAddr;

/// The token presented by a request: `Authorization: token <t>`, or HTTP Basic with user
/// `token` and password `<t>` (what httpie sends from `~/.netrc`). A request with more
/// than one `Authorization` header presents none: which one counts would be a guess.
pub fn presented_token(req: &HttpRequest) -> Option<String> {
    let mut values = req.headers().get_all(header::AUTHORIZATION);
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let value = value.to_str().ok()?;
    let (scheme, rest) = value.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("token") {
        return Some(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, password) = decoded.split_once(':')?;
        return (user == "token").then(|| password.to_owned());
    }
    None
}

/// The address a request comes from: its peer, or, when the peer is a trusted proxy, the
/// last address in `X-Forwarded-For` that is not a trusted proxy itself (the ones before
/// it are whatever the client wrote).
pub fn client_address(req: &HttpRequest, trusted: &Networks) -> IpAddr {
    let peer = req
        .peer_addr()
        .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    if !trusted.contains(peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    forwarded
        .into_iter()
        .rev()
        .find(|a| !trusted.contains(*a))
        .unwrap_or(peer)
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let token = presented_token(req);
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let address = state
            .as_ref()
            .map(|s| client_address(req, &s.trusted_proxies));
        Box::pin(async move {
            let (state, address) = state.zip(address).ok_or(ApiError::Internal)?;
            let token = token.ok_or(ApiError::Unauthorized)?;
            Ok(state.verifier.verify(&token, address).await?)
        })
    }
}
