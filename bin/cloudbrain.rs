//! The one cloudbrain binary: every role and operator command is a subcommand, and each
//! also answers to Cloud Brain's binary name (`cloudbrain-http`, `cloudbrain-create-token`, …)
//! when invoked through a link of that name.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use cloudbrain::auth::store::{self, Revoked};
use cloudbrain::auth::Scope;
use cloudbrain::broker::providers::{
    delete_provider, insert_provider, list_providers, update_provider,
};
use cloudbrain::broker::{fleet, pools, ANNOUNCED};
use cloudbrain::config::Config;
use cloudbrain::{db, roles, telemetry};
use diesel_async::AsyncPgConnection;

#[derive(Parser)]
#[command(name = "cloudbrain", version, about = "A multi-cloud instance broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Http,
    /// Run create and remove jobs.
    CreateWorker,
    /// Keep every instance in step with its cloud; reap stuck machines and orphans.
    RefreshWorker,
    /// Everything in one process on a throwaway database with the fake provider.
    Dev {
        /// A fleet file to start from instead of the lone fake provider (e.g.
        /// examples/fleet.yaml); its `{$env: CLOUDBRAIN_FAKE_STORE_URL}` is the database.
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
    },
    /// Apply pending database migrations.
    Migrate,
    /// Make an API token and print it (the only time its secret is shown).
    CreateToken {
        /// What the token is for.
        description: String,
        /// `client` sees its own instances; `admin` sees every instance.
        #[arg(long, value_enum, default_value = "client")]
        scope: Scope,
    },
    /// List tokens (never their secrets).
    ListTokens,
    /// Revoke a token; every running `http` process refuses it within a second.
    RevokeToken {
        /// The token's id (the part before the dash).
        id: i32,
    },
    /// Register a provider config, sealed with CLOUDBRAIN_DATABASE_ENCRYPTION_KEY.
    InsertProvider {
        /// The name clients will put in `provider`.
        #[arg(long)]
        name: String,
        /// The kind of cloud.
        #[arg(long = "type", value_parser = clap::builder::PossibleValuesParser::new(cloudbrain::providers::catalog::kinds()))]
        kind: String,
        /// A JSON file with the provider's config (defaults apply when omitted).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Replace a provider's config (its type stays); running workers use it within one cycle.
    UpdateProvider {
        /// The provider's name.
        #[arg(long)]
        name: String,
        /// A JSON file with the provider's new config.
        #[arg(long)]
        config: std::path::PathBuf,
    },
    /// Delete a provider config no pool names and no instance still runs on.
    DeleteProvider {
        /// The provider's name.
        #[arg(long)]
        name: String,
    },
    /// List registered providers (names and types, never configuration).
    ListProviders,
    /// Make the stored provider configs and pools what a fleet file says, in one
    /// transaction; prints the plan, field by field.
    Apply {
        /// The fleet file (YAML or JSON).
        #[arg(short = 'f', long = "file")]
        file: std::path::PathBuf,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also delete the provider configs and pools the file does not name.
        #[arg(long)]
        prune: bool,
    },
    /// Print the stored provider configs and pools as a fleet file, secrets as references.
    Export,
    /// List pools: shape, size and how their instances stand.
    Pools,
    /// Set how many idle machines a pool keeps warm (at most its max_size).
    Scale {
        /// The pool's name.
        name: String,
        /// Machines to keep booted and unassigned.
        min_idle: u32,
    },
}

/// Turns `cloudbrain-create-token ARGS` into `cloudbrain create-token ARGS`.
fn args_with_link_name() -> Vec<OsString> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let invoked = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    if let Some(sub) = invoked.strip_prefix("cloudbrain-") {
        if !sub.is_empty() {
            args.insert(1, sub.into());
        }
    }
    args
}

fn main() -> ExitCode {
    cloudbrain::memory::return_large_blocks();
    let cli = Cli::parse_from(args_with_link_name());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(config: &Config) -> anyhow::Result<AsyncPgConnection> {
    db::connect_migrated(config.direct_database_url()).await
}

async fn run(command: Command) -> anyhow::Result<()> {
    if let Command::Dev { file } = command {
        return cloudbrain::dev::run(file).await;
    }
    let config = Config::from_env()?;
    telemetry::init(config.log_json);
    match command {
        Command::Http => run_role(config, Role::Http).await,
        Command::CreateWorker => run_role(config, Role::JobWorker).await,
        Command::RefreshWorker => run_role(config, Role::RefreshWorker).await,
        // Handled above, before the environment is read.
        Command::Dev { .. } => anyhow::bail!("dev cannot run with a configured environment"),
        Command::Migrate => {
            let applied = db::run_migrations(config.direct_database_url()).await?;
            if applied.is_empty() {
                println!("database is up to date");
            }
            for version in applied {
                println!("applied migration {version}");
            }
            Ok(())
        }
        Command::CreateToken { description, scope } => {
            let mut conn = connect(&config).await?;
            let token = store::create_token(&mut conn, &description, scope)
                .await
                .context("storing the token")?;
            println!("generated token: {token}");
            Ok(())
        }
        Command::ListTokens => {
            let mut conn = connect(&config).await?;
            let tokens = store::list_tokens(&mut conn).await?;
            println!("ID\tSCOPE\tCREATED\tLAST USED\tREVOKED\tDESCRIPTION");
            let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map_or("-".to_owned(), |t| {
                    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
                })
            };
            for t in tokens {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    t.id,
                    t.scope,
                    time(Some(t.created_at)),
                    time(t.last_used_at),
                    time(t.revoked_at),
                    t.description.replace(['\t', '\n'], " ")
                );
            }
            Ok(())
        }
        Command::RevokeToken { id } => {
            let mut conn = connect(&config).await?;
            match store::revoke_token(&mut conn, cloudbrain::ids::TokenId(id)).await? {
                Revoked::Now => println!("revoked token {id}"),
                Revoked::Already => println!("token {id} was already revoked"),
                Revoked::NoSuchToken => bail!("there is no token {id}"),
            }
            Ok(())
        }
        Command::InsertProvider {
            name,
            kind,
            config: file,
        } => {
            let key = config.require_encryption_key()?.clone();
            let doc = match file {
                None => serde_json::Value::Null,
                Some(path) => read_config(&path)?,
            };
            let mut conn = connect(&config).await?;
            let offer = insert_provider(&mut conn, &key, &name, &kind, &doc).await?;
            println!(
                "registered provider {name} ({kind}), instance types: {}",
                offer.instance_types.join(", ")
            );
            Ok(())
        }
        Command::Apply {
            file,
            dry_run,
            prune,
        } => {
            let key = config.require_encryption_key()?.clone();
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let shown = file.display().to_string();
            let secrets = fleet::LocalSecrets {
                dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
                env: Default::default(),
            };
            let mut conn = connect(&config).await?;
            let how = fleet::How { prune, dry_run };
            let max_lifetime = config.max_lifetime;
            let plan = fleet::apply_document(&mut conn, &key, max_lifetime, &text, &secrets, how)
                .await
                .map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
            if plan.is_empty() {
                println!("no changes");
            }
            for line in plan.lines() {
                println!("{line}");
            }
            if dry_run && !plan.is_empty() {
                println!("(dry run: nothing changed)");
            }
            if !dry_run && !plan.is_empty() {
                // A pruned pool's drained machines: wake the workers for their jobs.
                db::announce::send_now(&mut conn, ANNOUNCED).await?;
            }
            Ok(())
        }
        Command::Export => {
            let key = config.require_encryption_key()?.clone();
            let mut conn = connect(&config).await?;
            let current = fleet::export(&mut conn, &key).await?;
            print!("{}", serde_norway::to_string(&current)?);
            Ok(())
        }
        Command::Pools => {
            let mut conn = connect(&config).await?;
            println!("NAME\tPROVIDER\tIMAGE\tTYPE\tMIN IDLE\tMAX SIZE\tIDLE\tBUSY\tSTARTING\tERRORED\tEXPIRING");
            for status in pools::list(&mut conn).await? {
                let (p, c) = (status.pool, status.counts);
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    p.name,
                    p.provider_name,
                    p.image,
                    p.instance_type,
                    p.min_idle,
                    p.max_size,
                    c.idle,
                    c.busy,
                    c.starting,
                    c.errored,
                    c.expiring
                );
            }
            Ok(())
        }
        Command::Scale { name, min_idle } => {
            let mut conn = connect(&config).await?;
            let status = pools::scale(&mut conn, &name, min_idle).await?;
            println!(
                "pool {name} keeps {min_idle} idle (max_size {}); the pool worker acts within one refresh cycle",
                status.pool.max_size
            );
            Ok(())
        }
        Command::UpdateProvider { name, config: file } => {
            let key = config.require_encryption_key()?.clone();
            let doc = read_config(&file)?;
            let mut conn = connect(&config).await?;
            let offer = update_provider(&mut conn, &key, &name, &doc).await?;
            println!(
                "updated provider {name}, instance types: {}; running workers use it within one cycle",
                offer.instance_types.join(", ")
            );
            Ok(())
        }
        Command::DeleteProvider { name } => {
            let mut conn = connect(&config).await?;
            delete_provider(&mut conn, &name).await?;
            println!("deleted provider {name}");
            Ok(())
        }
        Command::ListProviders => {
            let mut conn = connect(&config).await?;
            println!("NAME\tTYPE");
            for p in list_providers(&mut conn).await? {
                println!("{}\t{}", p.name, p.kind);
            }
            Ok(())
        }
    }
}

/// Reads a provider config file as JSON.
fn read_config(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Runs one role until SIGINT or SIGTERM.
async fn run_role(config: Config, role: Role) -> anyhow::Result<()> {
    db::require_migrated(config.direct_database_url()).await?;
    let services = roles::Services::new(config, role.default_pool_size())?;
    let (stop, shutdown) = cloudbrain::shutdown::channel();
    tokio::spawn(async move {
        roles::termination_signal().await;
        tracing::info!("stopping");
        let _ = stop.send(true);
    });
    match role {
        Role::Http => {
            let addr = services.config.addr;
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("listening on {addr}"))?;
            roles::http(&services, listener, shutdown).await
        }
        Role::JobWorker => roles::job_worker(&services, shutdown, true).await,
        Role::RefreshWorker => roles::refresh_worker(&services, shutdown, true).await,
    }
}

enum Role {
    Http,
    JobWorker,
    RefreshWorker,
}

impl Role {
    /// Its database connections when `CLOUDBRAIN_DATABASE_POOL_SIZE` is not set.
    fn default_pool_size(&self) -> usize {
        match self {
            Role::JobWorker => cloudbrain::config::JOB_WORKER_POOL_SIZE,
            Role::Http | Role::RefreshWorker => cloudbrain::config::DEFAULT_POOL_SIZE,
        }
    }
}
