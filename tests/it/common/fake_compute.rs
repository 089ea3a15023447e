//! A small stateful fake of Google's Compute Engine API, for the GCE provider's tests:
//! instances insert/get/list/delete, zone operations that go PENDING -> RUNNING -> DONE as
//! they are polled, VMs that go PROVISIONING -> STAGING -> RUNNING as they are read, label
//! filters, paging, requestId idempotency, 409 alreadyExists, 404 notFound, image families,
//! and injectable errors. Its response shapes are checked against Google's discovery
//! document and libcloud's recorded responses (tests/gce.rs).

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};

/// An error the fake answers with, to a number of inserts in a zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inject {
    /// The insert's operation ends with QUOTA_EXCEEDED.
    Quota,
    /// The insert's operation ends with ZONE_RESOURCE_POOL_EXHAUSTED.
    Exhausted,
    /// The insert is refused at once with 429 rateLimitExceeded.
    RateLimit,
    /// The insert is refused at once with 500.
    ServerError,
    /// The insert is refused at once with 400 (a bad field).
    BadRequest,
}

#[derive(Default)]
pub struct State {
    pub vms: BTreeMap<(String, String), Value>,
    pub ops: HashMap<String, (Value, u8, Option<Value>)>,
    request_ids: HashMap<String, String>,
    injected: Vec<(String, Inject, usize)>,
    pub families: HashMap<String, String>,
    counter: u64,
    /// Every request seen, as "METHOD path".
    pub requests: Vec<String>,
}

pub struct FakeCompute {
    pub url: String,
    pub state: Arc<Mutex<State>>,
    server: actix_web::dev::ServerHandle,
}

impl Drop for FakeCompute {
    fn drop(&mut self) {
        drop(self.server.stop(false));
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
}

/// GCE's 404 for resource `path`.
fn not_found(path: &str) -> HttpResponse {
    error(
        404,
        "NOT_FOUND",
        "notFound",
        &format!("The resource '{path}' was not found"),
    )
}

fn error(code: u16, status: &str, reason: &str, message: &str) -> HttpResponse {
    let body = json!({"error": {
        "code": code,
        "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}],
        "status": status,
    }});
    HttpResponse::build(actix_web::http::StatusCode::from_u16(code).unwrap()).json(body)
}

impl State {
    fn next_id(&mut self) -> u64 {
        self.counter += 1;
        4_006_034_190_819_017_000 + self.counter
    }

    fn operation(
        &mut self,
        base: &str,
        project: &str,
        zone: &str,
        kind: &str,
        target: &str,
        failure: Option<Value>,
    ) -> Value {
        let id = self.next_id();
        let name = format!("operation-{id}-{}", uuid::Uuid::new_v4().simple());
        let zone_url = format!("{base}/compute/v1/projects/{project}/zones/{zone}");
        let op = json!({
            "kind": "compute#operation",
            "id": id.to_string(),
            "name": name,
            "zone": zone_url,
            "operationType": kind,
            "targetLink": format!("{zone_url}/instances/{target}"),
            "targetId": (id + 7).to_string(),
            "status": "PENDING",
            "user": "fake@cloudbrain.test",
            "progress": 0,
            "insertTime": now(),
            "selfLink": format!("{zone_url}/operations/{name}"),
        });
        self.ops.insert(name, (op.clone(), 0, failure));
        op
    }
}

fn advance_vm(vm: &mut Value) {
    let next = match vm["status"].as_str() {
        Some("PROVISIONING") => "STAGING",
        Some("STAGING") => "RUNNING",
        Some(other) => other,
        None => "RUNNING",
    }
    .to_owned();
    vm["status"] = json!(next);
}

/// Reads `labels.KEY = "VALUE"` terms (joined by spaces or AND).
fn matches_filter(vm: &Value, filter: &str) -> bool {
    let mut rest = filter.trim();
    while !rest.is_empty() {
        let Some(term) = rest.strip_prefix("labels.") else {
            return false;
        };
        let Some((key, after)) = term.split_once('=') else {
            return false;
        };
        let after = after.trim_start();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((v, t)) => (v, t),
                None => return false,
            }
        } else {
            after.split_once(' ').unwrap_or((after, ""))
        };
        if vm["labels"][key.trim()].as_str() != Some(value) {
            return false;
        }
        rest = tail.trim_start();
        rest = rest.strip_prefix("AND").unwrap_or(rest).trim_start();
    }
    true
}

type Shared = web::Data<(Arc<Mutex<State>>, String)>;

async fn insert(
    data: Shared,
    path: web::Path<(String, String)>,
    query: web::Query<HashMap<String, String>>,
    body: web::Json<Value>,
) -> HttpResponse {
    let (project, zone) = path.into_inner();
    let base = data.1.clone();
    let mut state = data.0.lock().unwrap();
    state.requests.push(format!("POST {zone}/instances"));
    if let Some(request_id) = query.get("requestId") {
        if let Some(op) = state
            .request_ids
            .get(request_id)
            .and_then(|n| state.ops.get(n))
        {
            return HttpResponse::Ok().json(&op.0);
        }
    }
    let mut vm = body.into_inner();
    if let Some(image) = vm["disks"][0]["initializeParams"]["sourceImage"].as_str() {
        state.requests.push(format!("IMAGE {image}"));
    }
    let Some(name) = vm["name"].as_str().map(str::to_owned) else {
        return error(
            400,
            "INVALID_ARGUMENT",
            "required",
            "Required field 'resource.name' not specified",
        );
    };
    let injected = state
        .injected
        .iter_mut()
        .find(|(z, _, n)| *z == zone && *n > 0)
        .map(|entry| {
            entry.2 -= 1;
            entry.1
        });
    let failure = match injected {
        Some(Inject::RateLimit) => {
            return error(
                429,
                "RESOURCE_EXHAUSTED",
                "rateLimitExceeded",
                "Rate Limit Exceeded",
            )
        }
        Some(Inject::ServerError) => {
            return error(
                500,
                "INTERNAL",
                "backendError",
                "Internal error. Please try again.",
            )
        }
        Some(Inject::BadRequest) => {
            return error(
                400,
                "INVALID_ARGUMENT",
                "invalid",
                "Invalid value for field 'resource.machineType'",
            )
        }
        Some(Inject::Quota) => Some(
            json!({"code": "QUOTA_EXCEEDED", "message": "Quota 'CPUS' exceeded. Limit: 8.0 in region us-central1."}),
        ),
        Some(Inject::Exhausted) => Some(
            json!({"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": format!("The zone 'projects/{project}/zones/{zone}' does not have enough resources available to fulfill the request.")}),
        ),
        None => None,
    };
    if failure.is_none() {
        if state.vms.contains_key(&(zone.clone(), name.clone())) {
            return error(409, "ALREADY_EXISTS", "alreadyExists", &format!("The resource 'projects/{project}/zones/{zone}/instances/{name}' already exists"));
        }
        let id = state.next_id();
        let zone_url = format!("{base}/compute/v1/projects/{project}/zones/{zone}");
        vm["kind"] = json!("compute#instance");
        vm["id"] = json!(id.to_string());
        vm["creationTimestamp"] = json!(now());
        vm["status"] = json!("PROVISIONING");
        vm["zone"] = json!(zone_url);
        vm["selfLink"] = json!(format!("{zone_url}/instances/{name}"));
        vm["cpuPlatform"] = json!("Intel Cascade Lake");
        vm["canIpForward"] = json!(false);
        vm["labelFingerprint"] = json!("42WmSpB8rSM=");
        vm["fingerprint"] = json!("42WmSpB8rSM=");
        // GCE fills in scheduling when the request leaves it out.
        let scheduling = vm["scheduling"].take();
        vm["scheduling"] = json!({
            "automaticRestart": scheduling["automaticRestart"].as_bool().unwrap_or(true),
            "onHostMaintenance": scheduling["onHostMaintenance"].as_str().unwrap_or("MIGRATE"),
            "preemptible": scheduling["preemptible"].as_bool().unwrap_or(false),
            "provisioningModel": scheduling["provisioningModel"].as_str().unwrap_or("STANDARD"),
        });
        if let Some(metadata) = vm.get_mut("metadata") {
            metadata["kind"] = json!("compute#metadata");
            metadata["fingerprint"] = json!("42WmSpB8rSM=");
        }
        if let Some(nics) = vm["networkInterfaces"].as_array_mut() {
            for (i, nic) in nics.iter_mut().enumerate() {
                nic["kind"] = json!("compute#networkInterface");
                nic["name"] = json!(format!("nic{i}"));
                nic["networkIP"] = json!(format!("10.128.0.{}", 2 + id % 250));
                if let Some(configs) = nic["accessConfigs"].as_array_mut() {
                    for config in configs {
                        config["kind"] = json!("compute#accessConfig");
                        config["type"] = json!("ONE_TO_ONE_NAT");
                        config["natIP"] = json!(format!("203.0.113.{}", 1 + id % 250));
                    }
                }
            }
        }
        if let Some(disks) = vm["disks"].as_array_mut() {
            for (i, disk) in disks.iter_mut().enumerate() {
                disk["kind"] = json!("compute#attachedDisk");
                disk["index"] = json!(i);
                disk["mode"] = json!("READ_WRITE");
                disk["type"] = json!("PERSISTENT");
                disk["deviceName"] = json!(format!("persistent-disk-{i}"));
                disk["source"] = json!(format!("{zone_url}/disks/{name}"));
                if let Some(obj) = disk.as_object_mut() {
                    obj.remove("initializeParams");
                }
            }
        }
        state.vms.insert((zone.clone(), name.clone()), vm);
    }
    let op = state.operation(&base, &project, &zone, "insert", &name, failure);
    if let Some(request_id) = query.get("requestId") {
        let op_name = op["name"].as_str().unwrap().to_owned();
        state.request_ids.insert(request_id.clone(), op_name);
    }
    HttpResponse::Ok().json(op)
}

/// instances.setMetadata: replaces a VM's metadata when the request's fingerprint is the
/// VM's current one (412 conditionNotMet otherwise, as GCE answers).
async fn set_metadata(
    data: Shared,
    path: web::Path<(String, String, String)>,
    body: web::Json<Value>,
) -> HttpResponse {
    let (project, zone, name) = path.into_inner();
    let base = data.1.clone();
    let mut state = data.0.lock().unwrap();
    state
        .requests
        .push(format!("SETMETADATA {zone}/instances/{name}"));
    let Some(vm) = state.vms.get_mut(&(zone.clone(), name.clone())) else {
        return not_found(&format!("projects/{project}/zones/{zone}/instances/{name}"));
    };
    let current = vm["metadata"]["fingerprint"].as_str().map(str::to_owned);
    let mut metadata = body.into_inner();
    if current.is_some() && metadata["fingerprint"].as_str() != current.as_deref() {
        return error(
            412,
            "FAILED_PRECONDITION",
            "conditionNotMet",
            "Supplied fingerprint does not match current metadata fingerprint.",
        );
    }
    metadata["kind"] = json!("compute#metadata");
    metadata["fingerprint"] = json!(format!("fp-{}", uuid::Uuid::new_v4().simple()));
    vm["metadata"] = metadata;
    let op = state.operation(&base, &project, &zone, "setMetadata", &name, None);
    HttpResponse::Ok().json(op)
}

async fn get_vm(data: Shared, path: web::Path<(String, String, String)>) -> HttpResponse {
    let (project, zone, name) = path.into_inner();
    let mut state = data.0.lock().unwrap();
    state.requests.push(format!("GET {zone}/instances/{name}"));
    match state.vms.get_mut(&(zone.clone(), name.clone())) {
        Some(vm) => {
            let answer = vm.clone();
            advance_vm(vm);
            HttpResponse::Ok().json(answer)
        }
        None => not_found(&format!("projects/{project}/zones/{zone}/instances/{name}")),
    }
}

async fn delete_vm(data: Shared, path: web::Path<(String, String, String)>) -> HttpResponse {
    let (project, zone, name) = path.into_inner();
    let base = data.1.clone();
    let mut state = data.0.lock().unwrap();
    state
        .requests
        .push(format!("DELETE {zone}/instances/{name}"));
    if state.vms.remove(&(zone.clone(), name.clone())).is_none() {
        return not_found(&format!("projects/{project}/zones/{zone}/instances/{name}"));
    }
    let op = state.operation(&base, &project, &zone, "delete", &name, None);
    HttpResponse::Ok().json(op)
}

async fn list_vms(
    data: Shared,
    path: web::Path<(String, String)>,
    query: web::Query<HashMap<String, String>>,
) -> HttpResponse {
    let (project, zone) = path.into_inner();
    let base = data.1.clone();
    let mut state = data.0.lock().unwrap();
    state.requests.push(format!("LIST {zone}/instances"));
    let filter = query.get("filter").cloned().unwrap_or_default();
    let max: usize = query
        .get("maxResults")
        .and_then(|m| m.parse().ok())
        .unwrap_or(500);
    let start: usize = query
        .get("pageToken")
        .and_then(|t| t.strip_prefix("page-"))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let mut matching: Vec<&mut Value> = state
        .vms
        .iter_mut()
        .filter(|((z, _), vm)| *z == zone && matches_filter(vm, &filter))
        .map(|(_, vm)| vm)
        .collect();
    let total = matching.len();
    let mut items = Vec::new();
    for vm in matching.iter_mut().skip(start).take(max) {
        items.push(vm.clone());
        advance_vm(vm);
    }
    let mut list = json!({
        "kind": "compute#instanceList",
        "id": format!("projects/{project}/zones/{zone}/instances"),
        "items": items,
        "selfLink": format!("{base}/compute/v1/projects/{project}/zones/{zone}/instances"),
    });
    if start + max < total {
        list["nextPageToken"] = json!(format!("page-{}", start + max));
    }
    HttpResponse::Ok().json(list)
}

async fn get_operation(data: Shared, path: web::Path<(String, String, String)>) -> HttpResponse {
    let (project, zone, name) = path.into_inner();
    let mut state = data.0.lock().unwrap();
    state.requests.push(format!("GET {zone}/operations"));
    let Some((op, polls, failure)) = state.ops.get_mut(&name) else {
        return not_found(&format!(
            "projects/{project}/zones/{zone}/operations/{name}"
        ));
    };
    *polls += 1;
    match polls {
        1 => {
            op["status"] = json!("RUNNING");
            op["startTime"] = json!(now());
            op["progress"] = json!(0);
        }
        _ => {
            op["status"] = json!("DONE");
            op["progress"] = json!(100);
            op["endTime"] = json!(now());
            if let Some(failure) = failure.clone() {
                op["error"] = json!({"errors": [failure]});
                op["httpErrorStatusCode"] = json!(403);
                op["httpErrorMessage"] = json!("FORBIDDEN");
            }
        }
    }
    HttpResponse::Ok().json(op.clone())
}

async fn image_family(data: Shared, path: web::Path<(String, String)>) -> HttpResponse {
    let (project, family) = path.into_inner();
    let base = data.1.clone();
    let state = data.0.lock().unwrap();
    match state.families.get(&family) {
        Some(image) => HttpResponse::Ok().json(json!({
            "kind": "compute#image",
            "id": "5000000000000000001",
            "name": image,
            "family": family,
            "status": "READY",
            "creationTimestamp": now(),
            "selfLink": format!("{base}/compute/v1/projects/{project}/global/images/{image}"),
        })),
        None => not_found(&format!("projects/{project}/global/images/family/{family}")),
    }
}

async fn unknown(req: HttpRequest) -> HttpResponse {
    error(
        404,
        "NOT_FOUND",
        "notFound",
        &format!("fake compute has no route {} {}", req.method(), req.path()),
    )
}

impl FakeCompute {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let data = web::Data::new((state.clone(), url.clone()));
        let server = HttpServer::new(move || {
            let p = "/compute/v1/projects/{project}";
            App::new()
                .app_data(data.clone())
                .app_data(web::JsonConfig::default().limit(1 << 20))
                .route(
                    &format!("{p}/zones/{{zone}}/instances"),
                    web::post().to(insert),
                )
                .route(
                    &format!("{p}/zones/{{zone}}/instances"),
                    web::get().to(list_vms),
                )
                .route(
                    &format!("{p}/zones/{{zone}}/instances/{{name}}"),
                    web::get().to(get_vm),
                )
                .route(
                    &format!("{p}/zones/{{zone}}/instances/{{name}}"),
                    web::delete().to(delete_vm),
                )
                .route(
                    &format!("{p}/zones/{{zone}}/instances/{{name}}/setMetadata"),
                    web::post().to(set_metadata),
                )
                .route(
                    &format!("{p}/zones/{{zone}}/operations/{{op}}"),
                    web::get().to(get_operation),
                )
                .route(
                    &format!("{p}/global/images/family/{{family}}"),
                    web::get().to(image_family),
                )
                .default_service(web::to(unknown))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            url,
            state,
            server: handle,
        }
    }

    pub fn inject(&self, zone: &str, kind: Inject, count: usize) {
        self.state
            .lock()
            .unwrap()
            .injected
            .push((zone.to_owned(), kind, count));
    }

    pub fn vm_count(&self) -> usize {
        self.state.lock().unwrap().vms.len()
    }

    pub fn vms_in(&self, zone: &str) -> Vec<Value> {
        self.state
            .lock()
            .unwrap()
            .vms
            .iter()
            .filter(|((z, _), _)| z == zone)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Sets a VM's status, as a preemption or a stop would.
    pub fn set_status(&self, name: &str, status: &str) {
        for ((_, n), vm) in self.state.lock().unwrap().vms.iter_mut() {
            if n == name {
                vm["status"] = json!(status);
            }
        }
    }
}
