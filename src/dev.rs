//! `cloudbrain dev`: everything in one process for a first try — a throwaway PostgreSQL
//! (unless `DATABASE_URL` is set), migrations, a `fake` provider (or the providers and
//! pools of a fleet file), a token, the API, a job worker and a refresh worker. Ctrl-C
//! stops it all and removes the throwaway cluster.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use diesel_async::{AsyncConnection, AsyncPgConnection};

use crate::auth::{store, Scope};
use crate::broker::fleet;
use crate::broker::providers::{insert_provider, InsertProviderError};
use crate::config::Config;
use crate::roles::{self, Services};
use crate::{db, telemetry};

/// Applies fleet file `file` (its `{$env: CLOUDBRAIN_FAKE_STORE_URL}` being this
/// database, unless the environment says otherwise) and answers its pools.
async fn apply_fleet_file(
    conn: &mut AsyncPgConnection,
    config: &Config,
    file: &Path,
) -> anyhow::Result<Vec<crate::broker::pools::PoolStatus>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut env = std::collections::BTreeMap::new();
    if std::env::var_os(FAKE_STORE_ENV).is_none() {
        env.insert(FAKE_STORE_ENV.to_owned(), config.database_url.clone());
    }
    let secrets = fleet::LocalSecrets {
        dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        env,
    };
    let key = config.require_encryption_key()?;
    let how = fleet::How::default();
    fleet::apply_document(conn, key, config.max_lifetime, &text, &secrets, how)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    crate::db::announce::send_now(conn, crate::broker::ANNOUNCED).await?;
    Ok(crate::broker::pools::list(conn).await?)
}

/// The variable a fleet file names for the fake cloud's store.
const FAKE_STORE_ENV: &str = "CLOUDBRAIN_FAKE_STORE_URL";

/// A PostgreSQL cluster of its own in a temporary directory, removed on drop.
pub struct ThrowawayPostgres {
    dir: PathBuf,
    bin: PathBuf,
    user: Option<String>,
    options: String,
    /// Its connection string (superuser `postgres`, trust auth, loopback only).
    pub url: String,
}

fn find_pg_bin() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    found.sort();
    found
        .pop()
        .context("PostgreSQL's initdb and pg_ctl were not found: install PostgreSQL (Debian: apt-get install postgresql) or set DATABASE_URL")
}

impl ThrowawayPostgres {
    /// Starts a cluster on a free loopback port. Postgres refuses to run as root, so as
    /// root it runs as the `postgres` user.
    pub fn start() -> anyhow::Result<Self> {
        let bin = find_pg_bin()?;
        // SAFETY-free check of the effective user through `id`, to avoid a libc dependency.
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let user = is_root.then(|| "postgres".to_owned());
        let dir =
            std::env::temp_dir().join(format!("cloudbrain-dev-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let mut pg = Self {
            dir,
            bin,
            user,
            options: String::new(),
            url: String::new(),
        };
        if let Some(user) = &pg.user {
            let status = Command::new("chown").arg(user).arg(&pg.dir).status()?;
            if !status.success() {
                bail!(
                    "could not hand {} to user {user} (does the user exist?)",
                    pg.dir.display()
                );
            }
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let data = pg.dir.join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                path(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        pg.options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            path(&pg.dir)
        );
        pg.start_again()?;
        pg.url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        Ok(pg)
    }

    /// Starts the cluster (again, after [`ThrowawayPostgres::stop`]) on the same port.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        let log = self.dir.join("postgres.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path(&data),
                "-l",
                path(&log),
                "-o",
                &self.options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// Stops the cluster with pg_ctl's `mode` (`fast`: every session is told
    /// "terminating connection due to administrator command"; `immediate`: killed).
    pub fn stop(&self, mode: &str) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        self.run("pg_ctl", &["-D", path(&data), "-m", mode, "-w", "stop"])
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let program = self.bin.join(program);
        let output = match &self.user {
            Some(user) => Command::new("runuser")
                .arg("-u")
                .arg(user)
                .arg("--")
                .arg(&program)
                .args(args)
                .output(),
            None => Command::new(&program).args(args).output(),
        }
        .with_context(|| format!("running {}", program.display()))?;
        if !output.status.success() {
            bail!(
                "{} failed: {}{}",
                program.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let _ = self.stop("fast");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How to run httpie, so the request printed for pasting works as pasted: the project's
/// `.venv/bin/http` (where `script/server` installs it) by its full path, since a shell
/// pasting the line has no `.venv` on its PATH; else `http`.
fn httpie_command() -> String {
    std::env::current_dir()
        .map(|dir| dir.join(".venv/bin/http"))
        .ok()
        .filter(|venv| venv.is_file())
        .map_or_else(|| "http".to_owned(), |venv| venv.display().to_string())
}

/// Runs `cloudbrain dev` until Ctrl-C or SIGTERM.
pub async fn run(fleet_file: Option<PathBuf>) -> anyhow::Result<()> {
    let given_url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty());
    let throwaway = match given_url {
        Some(_) => None,
        None => Some(tokio::task::spawn_blocking(ThrowawayPostgres::start).await??),
    };
    let database_url = given_url.unwrap_or_else(|| {
        throwaway
            .as_ref()
            .map(|p| p.url.clone())
            .unwrap_or_default()
    });
    // A throwaway key for a throwaway database, unless one is given.
    let key = std::env::var("CLOUDBRAIN_DATABASE_ENCRYPTION_KEY")
        .ok()
        .filter(|k| !k.trim().is_empty())
        .unwrap_or_else(|| {
            use rand::RngCore;
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            hex::encode(key)
        });
    let config = Config::from_lookup(|name| match name {
        "DATABASE_URL" => Some(database_url.clone()),
        "CLOUDBRAIN_DATABASE_ENCRYPTION_KEY" => Some(key.clone()),
        // Things should move quickly in a first try.
        "CLOUDBRAIN_REFRESH_INTERVAL" => std::env::var(name).ok().or_else(|| Some("1".to_owned())),
        _ => std::env::var(name).ok(),
    })?;
    telemetry::init(config.log_json);
    let result = serve(config, fleet_file).await;
    drop(throwaway);
    result
}

async fn serve(config: Config, fleet_file: Option<PathBuf>) -> anyhow::Result<()> {
    db::run_migrations(&config.database_url).await?;
    let mut conn = AsyncPgConnection::establish(&config.database_url).await?;
    let key = config.require_encryption_key()?;
    let pools = match &fleet_file {
        Some(file) => apply_fleet_file(&mut conn, &config, file).await?,
        None => {
            // The fake cloud keeps its machines in this database, where psql can show them.
            let fake = serde_json::json!({"boot_time_ms": 3000, "store_url": config.database_url});
            match insert_provider(&mut conn, key, "fake", "fake", &fake).await {
                Ok(_) | Err(InsertProviderError::NameTaken(_)) => {}
                Err(error) => return Err(error.into()),
            }
            Vec::new()
        }
    };
    let token = store::create_token(&mut conn, "cloudbrain dev", Scope::Client).await?;
    drop(conn);

    let listener =
        TcpListener::bind(config.addr).with_context(|| format!("listening on {}", config.addr))?;
    let addr = listener.local_addr()?;
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        addr.ip().to_string()
    };
    let url = format!("http://{host}:{}", addr.port());
    println!("cloudbrain dev: API, create worker and refresh worker in one process");
    println!("url:      {url}");
    println!("token:    {token}");
    println!("database: {}", config.database_url);
    println!();
    let httpie = httpie_command();
    println!("try:      {httpie} --ignore-stdin POST {url}/instances \"Authorization: token {token}\" provider=fake image=ubuntu");
    println!("or:       curl -s -H \"Authorization: token {token}\" -H \"Content-Type: application/json\" -d '{{\"provider\":\"fake\",\"image\":\"ubuntu\"}}' {url}/instances");
    for pool in &pools {
        let name = &pool.pool.name;
        println!(
            "pool {name} keeps {} machines warm; this takes one, running at once:",
            pool.pool.min_idle
        );
        println!("          curl -s -H \"Authorization: token {token}\" -H \"Content-Type: application/json\" -d '{{\"pool\":\"{name}\"}}' {url}/instances");
    }
    println!("or put `machine {host} login token password {token}` in ~/.netrc and run");
    println!("          CLOUDBRAIN_URL={url} script/cloud-brain post instances provider=fake image=ubuntu");
    println!();
    println!(
        "Ctrl-C stops everything{}.",
        if std::env::var("DATABASE_URL").is_ok() {
            ""
        } else {
            " and removes the throwaway database"
        }
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let services = Services::new(config, crate::config::DEFAULT_POOL_SIZE)?;
    let (stop, shutdown) = crate::shutdown::channel();
    let http = roles::http(&services, listener, shutdown.clone());
    let jobs = roles::job_worker(&services, shutdown.clone(), false);
    let refresh = roles::refresh_worker(&services, shutdown, false);
    let signal = async {
        roles::termination_signal().await;
        tracing::info!("stopping");
        let _ = stop.send(true);
    };
    let (http, jobs, refresh, ()) = tokio::join!(http, jobs, refresh, signal);
    // Let in-flight provider calls settle before the database goes away.
    tokio::time::sleep(Duration::from_millis(50)).await;
    http.and(jobs).and(refresh)
}
