//! The container image and Kubernetes manifests (deploy/kubernetes) agree with the binary:
//! every container runs a real command, sets only settings the README documents, and
//! probes routes the process serves on the port it listens on. (Their shape against
//! Kubernetes' schemas is checked by `script/test` with kubernetes-validate.)

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cloudbrain");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every document of every manifest, as JSON values.
fn manifests() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap();
            let name = format!("{} {}", path.display(), value["metadata"]["name"]);
            docs.push((name, value));
        }
    }
    docs
}

fn subcommand_exists(name: &str) -> bool {
    Command::new(BIN)
        .args([name, "--help"])
        .output()
        .unwrap()
        .status
        .success()
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn every_container_runs_a_real_command_with_documented_settings_and_served_probes() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let docs = manifests();
    let mut containers = 0;
    for (name, doc) in &docs {
        let spec = match doc["kind"].as_str().unwrap() {
            "Deployment" | "Job" => &doc["spec"]["template"]["spec"],
            _ => continue,
        };
        for container in spec["containers"].as_array().unwrap() {
            containers += 1;
            let args = container["args"].as_array().unwrap();
            let command = args[0].as_str().unwrap();
            assert!(subcommand_exists(command), "{name}: `cloudbrain {command}`");
            let mut addr = None;
            for env in container["env"].as_array().unwrap() {
                let var = env["name"].as_str().unwrap();
                assert!(
                    readme.contains(&format!("| `{var}` |")),
                    "{name}: {var} is not in the README's settings"
                );
                if var == "CLOUDBRAIN_ADDR" && command == "http"
                    || var == "CLOUDBRAIN_METRICS_ADDR" && command != "http"
                {
                    addr = env["value"].as_str().map(port_of);
                }
            }
            let memory = &container["resources"];
            assert!(memory["requests"]["memory"].is_string(), "{name}: requests");
            assert!(memory["limits"]["memory"].is_string(), "{name}: limits");
            if command == "migrate" {
                continue;
            }
            let port = addr.unwrap_or_else(|| panic!("{name}: no listening address set"));
            let ports = container["ports"].as_array().unwrap();
            for probe in ["livenessProbe", "readinessProbe"] {
                let get = &container[probe]["httpGet"];
                let path = get["path"].as_str().unwrap();
                let expected = if probe == "livenessProbe" {
                    "/healthz"
                } else {
                    "/readyz"
                };
                assert_eq!(path, expected, "{name}: {probe}");
                let named = ports
                    .iter()
                    .find(|p| p["name"] == get["port"])
                    .unwrap_or_else(|| panic!("{name}: {probe} names no port"));
                assert_eq!(
                    named["containerPort"].as_u64(),
                    Some(port),
                    "{name}: {probe}"
                );
            }
        }
    }
    assert_eq!(
        containers, 4,
        "migrate, http, create-worker, refresh-worker"
    );
    let pdbs = docs
        .iter()
        .filter(|(_, doc)| doc["kind"] == "PodDisruptionBudget")
        .count();
    assert_eq!(pdbs, 3);
}

#[test]
fn the_image_runs_the_binary_as_a_user_with_the_api_by_default() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("cargo build --release --locked --bin cloudbrain"));
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/cloudbrain"]"#));
    let cmd = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("CMD "))
        .unwrap();
    let cmd: Vec<String> = serde_json::from_str(cmd).unwrap();
    assert!(subcommand_exists(&cmd[0]), "CMD {cmd:?}");
    assert!(dockerfile
        .lines()
        .any(|l| l.starts_with("USER ") && !l.contains("root")));
    let addr = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("ENV CLOUDBRAIN_ADDR="))
        .unwrap();
    assert!(dockerfile.contains(&format!("EXPOSE {}", port_of(addr))));
}
