//! The OpenAPI document as served: utoipa's from the handlers' annotations, with what the
//! server enforces that types alone cannot say (patterns, lengths, ranges, the registered
//! providers and the instance types each offers), so a client or a schema-driven fuzzer
//! built from it is never refused a request the document allows, nor served one it
//! forbids.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use utoipa::openapi::{Content, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{IntoResponses, OpenApi};

use super::error::ApiError;
use super::ApiDoc;
use crate::broker::instances::{CURSOR_PATTERN, MAX_PAGE_SIZE};
use crate::broker::pools::MAX_POOL_SIZE;
use crate::broker::stream::POSITION_PATTERN;
use crate::broker::validate::{
    required_text_pattern, ssh_public_key_pattern, BLANK_PATTERN, MAX_IMAGE_LEN, MAX_PROVIDER_LEN,
    MAX_SSH_KEY_LEN, POOL_NAME_PATTERN,
};
use crate::broker::State;
use cloudbrain_provider::DEFAULT_TYPE_ALIAS;

/// An `Idempotency-Key`: printable ASCII, inner spaces only (HTTP strips outer ones).
const IDEMPOTENCY_KEY_PATTERN: &str = r"^[\x21-\x7E](?:[\x20-\x7E]{0,253}[\x21-\x7E])?$";

/// Refusals any route taking a token may answer: `responses(.., TokenRefusals)`.
pub struct TokenRefusals;

/// What a route only admins may call adds to [`TokenRefusals`].
pub struct AdminRefusals;

/// Refusals of a route that reads a body, before anything in it is looked at.
pub struct BodyRefusals;

impl IntoResponses for TokenRefusals {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        refusals(&[
            (401, "Missing or invalid token"),
            (503, "Database unavailable"),
        ])
    }
}

impl IntoResponses for AdminRefusals {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        refusals(&[(403, "Not an admin token")])
    }
}

impl IntoResponses for BodyRefusals {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        refusals(&[
            (400, "Malformed, or a key given twice"),
            (408, "The body did not arrive in time"),
            (413, "Body over 64 KiB"),
            (415, "A Content-Type the route does not read"),
        ])
    }
}

/// Error responses, each with an `ErrorBody`.
fn refusals(list: &[(u16, &str)]) -> BTreeMap<String, RefOr<Response>> {
    let error_body = || Content::new(Some(Ref::from_schema_name("ErrorBody")));
    list.iter()
        .map(|&(status, description)| {
            let response = ResponseBuilder::new()
                .description(description)
                .content("application/json", error_body());
            (status.to_string(), RefOr::T(response.build()))
        })
        .collect()
}

/// What a pool makes, as a request naming it may restate it.
#[derive(Debug, Clone)]
pub struct PoolShape {
    /// The pool's name.
    pub name: String,
    /// Its provider config.
    pub provider: String,
    /// Its image.
    pub image: String,
    /// Its instance type.
    pub instance_type: String,
    /// The longest lifetime a request for it may ask, in seconds.
    pub most_ttl: u64,
}

/// What a provider config offers a request.
#[derive(Debug, Clone)]
pub struct ProviderShape {
    /// Its name.
    pub name: String,
    /// The instance types it offers.
    pub instance_types: Vec<String>,
    /// The longest lifetime a request on it may ask, in seconds.
    pub most_ttl: u64,
}

/// The document for a server whose providers offer `offered`, whose pools are `pools`
/// and whose own longest lifetime is `broker_most` seconds (what bounds a pool's).
pub fn document(
    offered: &[ProviderShape],
    pools: &[PoolShape],
    broker_most: u64,
) -> Result<Value, ApiError> {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).map_err(|error| {
        tracing::error!(%error, "the OpenAPI document does not serialise");
        ApiError::Internal
    })?;
    let text = required_text_pattern();
    let instance_type = |types: Vec<&str>| {
        let mut names: Vec<&str> = types;
        names.extend([DEFAULT_TYPE_ALIAS, ""]);
        names.sort_unstable();
        names.dedup();
        json!({"anyOf": [{"type": "null"}, {"type": "string", "enum": names}]})
    };
    let every_type: Vec<&str> = offered
        .iter()
        .flat_map(|p| p.instance_types.iter().map(String::as_str))
        .collect();
    let ttl = |most: u64| json!({"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 1, "maximum": most}]});
    let most_ttl = (offered.iter().map(|p| p.most_ttl))
        .chain(pools.iter().map(|p| p.most_ttl))
        .chain([broker_most])
        .max()
        .unwrap_or(broker_most);
    // A request names a provider and an image, or a pool (restating, at most, what the
    // pool makes): one branch each.
    let null_or = |value: &str| json!({"anyOf": [{"type": "null"}, {"const": value}]});
    let by_provider: Vec<Value> = offered
        .iter()
        .map(|p| {
            json!({"properties": {
                "provider": {"const": p.name},
                "instance_type": instance_type(p.instance_types.iter().map(String::as_str).collect()),
            }})
        })
        .collect();
    let branches: Vec<Value> = by_provider
        .iter()
        .zip(offered)
        .map(|(branch, p)| {
            let mut branch = branch.clone();
            branch["required"] = json!(["provider", "image"]);
            branch["properties"]["pool"] = json!({"type": "null"});
            branch["properties"]["ttl_seconds"] = ttl(p.most_ttl);
            branch
        })
        .chain(pools.iter().map(|pool| {
            json!({"required": ["pool"], "properties": {
                "pool": {"const": pool.name},
                "provider": null_or(&pool.provider),
                "image": null_or(&pool.image),
                "instance_type": instance_type(vec![&pool.instance_type]),
                "ttl_seconds": ttl(pool.most_ttl),
            }})
        }))
        .collect();
    let names: Vec<&str> = offered.iter().map(|p| p.name.as_str()).collect();
    let body = &mut doc["components"]["schemas"]["CreateInstanceBody"];
    body["properties"]["provider"] = json!({
        "type": "string", "enum": names, "maxLength": MAX_PROVIDER_LEN,
        "description": "A registered provider config's name (see `GET /providers`)."
    });
    body["properties"]["image"] = json!({
        "type": "string", "maxLength": MAX_IMAGE_LEN, "pattern": text,
        "description": "The image to boot; `default` is the provider config's image."
    });
    body["properties"]["instance_type"] = instance_type(every_type.clone());
    body["properties"]["public_ssh_key"] = json!({"anyOf": [
        {"type": "null"},
        {"type": "string", "pattern": BLANK_PATTERN, "description": "No key."},
        {"type": "string", "maxLength": MAX_SSH_KEY_LEN, "pattern": ssh_public_key_pattern(),
         "description": "One OpenSSH public key line."},
    ]});
    let pool_names: Vec<&str> = pools.iter().map(|pool| pool.name.as_str()).collect();
    body["properties"]["pool"] = if pools.is_empty() {
        json!({"type": "null", "description": "No pools are defined."})
    } else {
        json!({"anyOf": [{"type": "null"}, {"type": "string", "enum": pool_names,
            "description": "A pool's name (see `GET /pools`)."}]})
    };
    body["properties"]["ttl_seconds"] = json!({"anyOf": [
        {"type": "null"},
        {"type": "integer", "minimum": 1, "maximum": most_ttl,
         "description": "Seconds the machine may live; absent: the longest this broker gives."},
    ]});
    any_of(body, branches);

    let spec = &mut doc["components"]["schemas"]["PoolSpecBody"];
    spec["properties"]["provider"] = json!({"type": "string", "enum": names});
    spec["properties"]["image"] =
        json!({"type": "string", "maxLength": MAX_IMAGE_LEN, "pattern": text});
    spec["properties"]["instance_type"] = instance_type(every_type);
    any_of(spec, by_provider);
    spec["description"] = json!("A pool's shape and size; its min_idle is at most its max_size.");
    for size in ["min_idle", "max_size"] {
        spec["properties"][size]["maximum"] = json!(MAX_POOL_SIZE);
    }
    spec["properties"]["max_lifetime_secs"] = json!({"anyOf": [{"type": "null"},
        {"type": "integer", "minimum": 1, "maximum": broker_most}]});
    doc["components"]["schemas"]["ScaleBody"]["properties"]["min_idle"]["maximum"] =
        json!(MAX_POOL_SIZE);
    for (path, method) in [
        ("/pools/{name}", "get"),
        ("/pools/{name}", "put"),
        ("/pools/{name}", "delete"),
        ("/pools/{name}/scale", "post"),
    ] {
        set_parameter(
            &mut doc,
            path,
            method,
            "name",
            json!({"type": "string", "pattern": POOL_NAME_PATTERN}),
        );
    }

    let states: Vec<&str> = State::ALL.iter().map(|s| s.as_str()).collect();
    for path in ["/instances", "/stream/instances"] {
        set_parameter(
            &mut doc,
            path,
            "get",
            "state",
            json!({"type": "string", "enum": states}),
        );
        set_parameter(
            &mut doc,
            path,
            "get",
            "provider",
            json!({"type": "string", "maxLength": MAX_PROVIDER_LEN, "pattern": text}),
        );
    }
    let stream_parameters = [
        (
            "pool",
            json!({"type": "string", "pattern": POOL_NAME_PATTERN}),
        ),
        ("instance", json!({"type": "string", "format": "uuid"})),
        (
            "Last-Event-ID",
            json!({"type": "string", "pattern": POSITION_PATTERN}),
        ),
    ];
    for (name, schema) in stream_parameters {
        set_parameter(&mut doc, "/stream/instances", "get", name, schema);
    }
    set_parameter(
        &mut doc,
        "/instances",
        "get",
        "limit",
        json!({"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE}),
    );
    set_parameter(
        &mut doc,
        "/instances",
        "get",
        "cursor",
        json!({"type": "string", "pattern": CURSOR_PATTERN}),
    );
    set_parameter(
        &mut doc,
        "/instances",
        "post",
        "Idempotency-Key",
        json!({"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN}),
    );
    Ok(doc)
}

/// Makes `schema` hold when one of `branches` does; none: nothing is valid (no provider
/// or pool can serve a request).
fn any_of(schema: &mut Value, branches: Vec<Value>) {
    if branches.is_empty() {
        schema["not"] = json!({});
    } else {
        schema["anyOf"] = Value::Array(branches);
    }
}

/// Replaces the schema of parameter `name` of `method path`.
fn set_parameter(doc: &mut Value, path: &str, method: &str, name: &str, schema: Value) {
    if let Some(parameters) = doc["paths"][path][method]["parameters"].as_array_mut() {
        for parameter in parameters.iter_mut().filter(|p| p["name"] == name) {
            parameter["schema"] = schema.clone();
        }
    }
}
