//! The operator commands, run as a user would: the real binary, a real database.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::{count, TempDir, TestDb, KEY_HEX};

const BIN: &str = env!("CARGO_BIN_EXE_cloudbrain");

fn run(program: &Path, db: &TestDb, key: Option<&str>, args: &[&str]) -> Output {
    run_with(program, db, key, args, &[])
}

fn run_with(
    program: &Path,
    db: &TestDb,
    key: Option<&str>,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn");
    if let Some(key) = key {
        command.env("CLOUDBRAIN_DATABASE_ENCRYPTION_KEY", key);
    }
    command.output().unwrap()
}

fn cloudbrain(db: &TestDb, args: &[&str]) -> Output {
    run(Path::new(BIN), db, Some(KEY_HEX), args)
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn is_token_line(line: &str) -> bool {
    let Some(token) = line.strip_prefix("generated token: ") else {
        return false;
    };
    let Some((id, secret)) = token.split_once('-') else {
        return false;
    };
    id.parse::<u32>().is_ok()
        && secret.len() == 32
        && secret
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[tokio::test]
async fn tokens_are_made_listed_and_revoked_from_the_command_line() {
    let db = TestDb::new().await;
    let out = stdout(&cloudbrain(&db, &["create-token", "ci runners"]));
    assert!(out.ends_with('\n') && out.lines().count() == 1, "{out:?}");
    assert!(is_token_line(out.trim_end()), "{out:?}");
    let token = out
        .trim_end()
        .strip_prefix("generated token: ")
        .unwrap()
        .to_owned();
    let (id, secret) = token.split_once('-').unwrap();

    // Cloud Brain's binary names work through links.
    let dir = TempDir::new("cloudbrain-cli");
    let link = dir.join("cloudbrain-create-token");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let linked = stdout(&run(&link, &db, None, &["operators", "--scope", "admin"]));
    assert!(is_token_line(linked.trim_end()), "{linked:?}");

    let listed = stdout(&cloudbrain(&db, &["list-tokens"]));
    assert!(
        listed.contains("ci runners") && listed.contains("operators"),
        "{listed}"
    );
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&format!("{id}\tclient\t"))),
        "{listed}"
    );
    assert!(listed.contains("\tadmin\t"), "{listed}");
    assert!(!listed.contains(secret), "list-tokens printed a secret");
    let mut conn = db.conn().await;
    let hash = cloudbrain::auth::store::find_token(
        &mut conn,
        cloudbrain::ids::TokenId(id.parse().unwrap()),
    )
    .await
    .unwrap()
    .unwrap()
    .token_hash;
    assert!(
        !listed.contains(&hex::encode(hash)),
        "list-tokens printed a hash"
    );

    let link = dir.join("cloudbrain-revoke-token");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    assert_eq!(
        stdout(&run(&link, &db, None, &[id])),
        format!("revoked token {id}\n")
    );
    assert!(stdout(&cloudbrain(&db, &["revoke-token", id])).contains("already revoked"));
    let listed = stdout(&cloudbrain(&db, &["list-tokens"]));
    let row = listed
        .lines()
        .find(|l| l.starts_with(&format!("{id}\t")))
        .unwrap();
    assert_eq!(
        row.split('\t').nth(4).unwrap().len(),
        20,
        "revoked time missing: {row}"
    );

    let missing = cloudbrain(&db, &["revoke-token", "424242"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no token 424242"));
}

#[tokio::test]
async fn providers_are_registered_sealed_and_refused_with_reasons() {
    let db = TestDb::new().await;
    let dir = TempDir::new("cloudbrain-cli");
    let config = dir.join("fake.json");
    std::fs::write(
        &config,
        r#"{"instance_types": ["standard", "gpu"], "boot_time_ms": 10, "seed": 7}"#,
    )
    .unwrap();
    let out = stdout(&cloudbrain(
        &db,
        &[
            "insert-provider",
            "--name",
            "fake-gpu",
            "--type",
            "fake",
            "--config",
            config.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("fake-gpu") && out.contains("gpu"), "{out}");
    stdout(&cloudbrain(
        &db,
        &["insert-provider", "--name", "fake", "--type", "fake"],
    ));
    assert_eq!(
        stdout(&cloudbrain(&db, &["list-providers"])),
        "NAME\tTYPE\nfake\tfake\nfake-gpu\tfake\n"
    );

    // The stored config is sealed: its contents do not appear in the row.
    let mut conn = db.conn().await;
    let plain = count(
        &mut conn,
        "SELECT count(*) AS n FROM providers WHERE position('boot_time_ms'::bytea in config) > 0",
    )
    .await;
    assert_eq!(plain, 0);

    let failures: Vec<(Option<&str>, Vec<&str>, &str)> = vec![
        (
            None,
            vec!["--name", "x", "--type", "fake"],
            "CLOUDBRAIN_DATABASE_ENCRYPTION_KEY is not set",
        ),
        (
            Some("abc"),
            vec!["--name", "x", "--type", "fake"],
            "CLOUDBRAIN_DATABASE_ENCRYPTION_KEY is invalid",
        ),
        (
            Some(KEY_HEX),
            vec!["--name", "fake", "--type", "fake"],
            "already exists",
        ),
        (Some(KEY_HEX), vec!["--name", "x", "--type", "ec2"], "ec2"),
        (
            Some(KEY_HEX),
            vec![
                "--name",
                "x",
                "--type",
                "fake",
                "--config",
                "/nonexistent.json",
            ],
            "/nonexistent.json",
        ),
    ];
    for (key, args, message) in failures {
        let mut all = vec!["insert-provider"];
        all.extend(args.iter());
        let output = run(Path::new(BIN), &db, key, &all);
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // Every refusal names the field, type errors included.
    for (doc, message) in [
        (
            r#"{"throttle_rate": 3}"#,
            "throttle_rate: must be between 0 and 1",
        ),
        (
            r#"{"boot_time_ms": "fast"}"#,
            r#"boot_time_ms: expected an integer, got string "fast""#,
        ),
        (
            r#"{"default_instance_type": "gpu"}"#,
            r#"default_instance_type: "gpu" is not one of the instance types offered"#,
        ),
        (
            r#"{"instance_types": ["default"]}"#,
            "instance_types: \"default\" is reserved",
        ),
        (r#"{"bogus": 1}"#, "unknown field `bogus`"),
    ] {
        let bad = dir.join("bad.json");
        std::fs::write(&bad, doc).unwrap();
        let output = cloudbrain(
            &db,
            &[
                "insert-provider",
                "--name",
                "y",
                "--type",
                "fake",
                "--config",
                bad.to_str().unwrap(),
            ],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{doc} was accepted");
        assert!(stderr.contains(message), "{doc}: {stderr}");
    }
    assert_eq!(
        stdout(&cloudbrain(&db, &["list-providers"]))
            .lines()
            .count(),
        3
    );
}

#[tokio::test]
async fn migrate_is_safe_to_run_concurrently_and_again() {
    let db = unmigrated_db().await;
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(BIN)
                .arg("migrate")
                .env("DATABASE_URL", &db.url)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut applied = 0;
    for child in children {
        let out = stdout(&child.wait_with_output().unwrap());
        applied += out
            .lines()
            .filter(|l| l.starts_with("applied migration"))
            .count();
    }
    assert!(applied >= 1);
    assert_eq!(
        stdout(&cloudbrain(&db, &["migrate"])),
        "database is up to date\n"
    );
    assert_eq!(db.count_instances(None).await, 0);
}

#[tokio::test]
async fn schema_rs_is_what_diesel_print_schema_prints() {
    let db = TestDb::new().await;
    let output = Command::new("diesel")
        .args(["print-schema", "--database-url", &db.url])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the diesel CLI must be installed (script/test installs it)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8(output.stdout).unwrap();
    let ours =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/db/schema.rs"))
            .unwrap();
    assert_eq!(
        ours, printed,
        "src/db/schema.rs differs from `diesel print-schema`"
    );
}

#[tokio::test]
async fn an_unmigrated_database_says_run_migrate_and_an_unreachable_one_says_where() {
    let db = unmigrated_db().await;
    for args in [
        &["create-token", "x"][..],
        &["list-tokens"],
        &["http"],
        &["create-worker"],
        &["refresh-worker"],
    ] {
        let output = cloudbrain(&db, args);
        assert!(!output.status.success(), "{args:?} ran unmigrated");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("run `cloudbrain migrate`"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("does not exist"), "{args:?}: {stderr}");
    }
    // A server started before the migration is not ready, and says why.
    let app = crate::common::TestApp::spawn(&db).await;
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains("cloudbrain migrate"),
        "{body}"
    );
    stdout(&cloudbrain(&db, &["migrate"]));
    assert_eq!(app.anonymous_status("/readyz").await, 200);

    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = Command::new(BIN)
        .arg("list-tokens")
        .env_clear()
        .env(
            "DATABASE_URL",
            format!("postgres://cb:hunter2@127.0.0.1:{port}/cb"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&format!("127.0.0.1:{port}/cb")), "{stderr}");
    assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// A test database with nothing in it: the template comes migrated, so start over.
async fn unmigrated_db() -> TestDb {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    diesel_async::SimpleAsyncConnection::batch_execute(
        &mut conn,
        "DROP SCHEMA public CASCADE; CREATE SCHEMA public;",
    )
    .await
    .unwrap();
    db
}

#[tokio::test]
async fn pools_are_listed_and_scaled_from_the_command_line() {
    let s = crate::common::TestBroker::new()
        .fake(serde_json::json!(null))
        .start()
        .await;
    let admin = s.client_with(cloudbrain::auth::Scope::Admin).await;
    let pool =
        serde_json::json!({"provider": "fake", "image": "ubuntu", "min_idle": 1, "max_size": 4});
    admin.put("/pools/ci", &pool).await.expect(200);

    let listed = stdout(&cloudbrain(&s.db, &["pools"]));
    assert_eq!(
        listed,
        "NAME\tPROVIDER\tIMAGE\tTYPE\tMIN IDLE\tMAX SIZE\tIDLE\tBUSY\tSTARTING\tERRORED\tEXPIRING\n\
         ci\tfake\tubuntu\tstandard\t1\t4\t0\t0\t0\t0\t0\n"
    );
    let scaled = stdout(&cloudbrain(&s.db, &["scale", "ci", "3"]));
    assert!(
        scaled.starts_with("pool ci keeps 3 idle (max_size 4)"),
        "{scaled}"
    );
    assert_eq!(admin.get("/pools/ci").await.expect(200)["min_idle"], 3);

    for (args, says) in [
        (
            &["scale", "ci", "5"][..],
            "min_idle must be at most the pool's max_size, 4",
        ),
        (
            &["scale", "elsewhere", "1"],
            "pool \"elsewhere\" does not exist",
        ),
    ] {
        let refused = cloudbrain(&s.db, args);
        assert!(!refused.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let not_a_number = cloudbrain(&s.db, &["scale", "ci", "-1"]);
    assert!(!not_a_number.status.success());
}

#[tokio::test]
async fn a_provider_is_updated_in_place_and_deleted_once_nothing_uses_it() {
    let s = crate::common::TestBroker::new()
        .fake(serde_json::json!({"boot_time_ms": 0}))
        .start()
        .await;
    let dir = TempDir::new("cloudbrain-cli");
    let write = |name: &str, doc: serde_json::Value| {
        let path = dir.join(name);
        std::fs::write(&path, doc.to_string()).unwrap();
        path.to_str().unwrap().to_owned()
    };
    s.db.ends_with_jobs(&["create dead"]);
    let store = s.db.url.clone();
    let refusing = write(
        "refusing.json",
        serde_json::json!({"instance_types": ["standard", "large"], "invalid_images": ["ubuntu"], "store_url": store}),
    );
    let running = s.create("ubuntu").await;
    s.settle(&running, "running").await;

    let out = stdout(&cloudbrain(
        &s.db,
        &["update-provider", "--name", "fake", "--config", &refusing],
    ));
    assert!(out.contains("instance types: standard, large"), "{out}");
    // Requests see the new offer at once; a worker uses the new config within its cycle.
    let large =
        serde_json::json!({"provider": "fake", "image": "debian", "instance_type": "large"});
    s.client().post("/instances", &large).await.expect(200);
    tokio::time::sleep(cloudbrain::providers::RELOAD_AFTER).await;
    let refused = s.create("ubuntu").await;
    s.workers.run_pending_jobs().await;
    s.assert_errored(&refused, "image \"ubuntu\" does not exist")
        .await;
    assert_eq!(
        s.body(&running).await["state"],
        "running",
        "the machine it had stays"
    );

    for (args, says) in [
        (
            vec![
                "update-provider",
                "--name",
                "nowhere",
                "--config",
                &refusing,
            ],
            "there is no provider named \"nowhere\"",
        ),
        (
            vec!["delete-provider", "--name", "fake"],
            "not yet terminated",
        ),
    ] {
        let failed = cloudbrain(&s.db, &args);
        assert!(!failed.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let bad = write("bad.json", serde_json::json!({"max_concurrency": 0}));
    let failed = cloudbrain(
        &s.db,
        &["update-provider", "--name", "fake", "--config", &bad],
    );
    assert!(String::from_utf8_lossy(&failed.stderr).contains("max_concurrency"));

    let instances = s
        .client_with(cloudbrain::auth::Scope::Admin)
        .await
        .get("/instances")
        .await
        .expect(200);
    for instance in instances["instances"].as_array().unwrap() {
        s.delete_and_run_jobs(instance["id"].as_str().unwrap())
            .await;
    }
    s.workers.refresh.refresh_all().await;
    stdout(&cloudbrain(&s.db, &["delete-provider", "--name", "fake"]));
    assert_eq!(
        stdout(&cloudbrain(&s.db, &["list-providers"])),
        "NAME\tTYPE\n"
    );
    let gone = s
        .client()
        .post(
            "/instances",
            &serde_json::json!({"provider": "fake", "image": "x"}),
        )
        .await;
    assert_eq!(gone.expect(422)["field"], "provider");
}

#[tokio::test]
async fn a_fleet_file_is_planned_applied_exported_and_applied_again_as_a_no_op() {
    let db = TestDb::new().await;
    let dir = TempDir::new("cloudbrain-fleet");
    let url = db.url.clone();
    let apply = |file: &str, extra: &[&str]| {
        let path = dir.join(file);
        let mut args = vec!["apply", "-f", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_with(
            Path::new(BIN),
            &db,
            Some(KEY_HEX),
            &args,
            &[("FLEET_STORE", &url)],
        )
    };
    let fleet = |min_idle: u32, pool: bool| {
        let mut text = "providers:\n  fake:\n    type: fake\n    config:\n      instance_types: [standard, premium]\n      store_url: {$env: FLEET_STORE}\n".to_owned();
        if pool {
            text += &format!("pools:\n  ci:\n    provider: fake\n    image: ubuntu\n    min_idle: {min_idle}\n    max_size: 4\n");
        }
        text
    };
    std::fs::write(dir.join("fleet.yaml"), fleet(2, true)).unwrap();

    let planned = stdout(&apply("fleet.yaml", &["--dry-run"]));
    assert_eq!(
        planned,
        "create provider fake (fake): instance_types, store_url\n\
         create pool ci: provider fake, image ubuntu, instance_type (default), min_idle 2, max_size 4, max_lifetime_secs (default)\n\
         (dry run: nothing changed)\n"
    );
    assert_eq!(
        stdout(&cloudbrain(&db, &["list-providers"])),
        "NAME\tTYPE\n"
    );
    let applied = stdout(&apply("fleet.yaml", &[]));
    assert!(applied.starts_with("create provider fake"), "{applied}");
    assert!(stdout(&cloudbrain(&db, &["pools"])).contains("ci\tfake\tubuntu\tstandard\t2\t4"));
    assert_eq!(stdout(&apply("fleet.yaml", &[])), "no changes\n");

    // An export holds the reference, never the secret, and applies as no change.
    let exported = stdout(&cloudbrain(&db, &["export"]));
    assert!(exported.contains("$env: FLEET_STORE"), "{exported}");
    assert!(!exported.contains(&url), "{exported}");
    std::fs::write(dir.join("export.yaml"), &exported).unwrap();
    assert_eq!(stdout(&apply("export.yaml", &[])), "no changes\n");

    std::fs::write(dir.join("fleet.yaml"), fleet(3, true)).unwrap();
    assert_eq!(
        stdout(&apply("fleet.yaml", &[])),
        "update pool ci: min_idle 2 → 3\n"
    );
    std::fs::write(dir.join("fleet.yaml"), fleet(3, false)).unwrap();
    assert_eq!(
        stdout(&apply("fleet.yaml", &[])),
        "no changes\n",
        "without --prune nothing goes"
    );
    assert_eq!(
        stdout(&apply("fleet.yaml", &["--prune"])),
        "delete pool ci\n"
    );

    // Bad files: the line and the field, and nothing changed.
    let bad = [
        ("pools:\n  ci:\n    provider: fake\n    image: ubuntu\n    max_size: ten\n", "line 5: pools.ci.max_size"),
        ("pools:\n  ci:\n    provider: fake\n    image: ubuntu\n    min_idle: 9\n    max_size: 4\n", "line 5: pools.ci.min_idle"),
        ("providers:\n  fake:\n    type: fake\n    config:\n      max_concurrency: 0\n", "line 5: providers.fake.config.max_concurrency"),
        ("providers:\n  gone:\n    type: fake\n    config:\n      store_url: {$env: UNSET_VAR}\n", "providers.gone.config.store_url: environment variable UNSET_VAR is not set"),
    ];
    for (text, says) in bad {
        std::fs::write(dir.join("bad.yaml"), text).unwrap();
        let failed = apply("bad.yaml", &[]);
        assert!(!failed.status.success(), "{text}");
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(stderr.contains(says), "{text}: {stderr}");
    }
    assert_eq!(stdout(&cloudbrain(&db, &["pools"])).lines().count(), 1);
}
