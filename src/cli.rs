//! The command line: `serve`, `api`, `workers`, `migrate`, `gate`, `keys`, `outbox`,
//! `world check|test|push`, `decide`, `audit verify|export|prune`. Glue only: every command is a thin
//! layer over the library, and the only place besides `main` where `anyhow` is used. Commands
//! that need async build the runtime here, by hand.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context as _};
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::sandbox::Sandbox;
use crate::service::auth;
use crate::store::{NewKey, OutboxStatus, Scope, Store};
use crate::worlds::{self, cases, context::SystemValues, load};

#[derive(Debug, Parser)]
#[command(
    name = "spectral",
    version,
    about = "Deterministic decisions for software agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the API (port 8000 by default) and the workers. With no configuration: SQLite
    /// under ./data, the example worlds from ./predicates published and deployed, an operator
    /// key printed once.
    Serve,
    /// Run the API alone (its events are handled by `spectral workers` of the same
    /// SPECTRAL_GENERATION).
    Api,
    /// Run the workers alone: the outbox consumer of SPECTRAL_GENERATION.
    Workers,
    /// Inspect and act on outbox rows.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Poll a service's /health until the expected build is live and healthy: the go/no-go
    /// step of a deploy. Exits 0 when live, 1 when the timeout passes first.
    Gate {
        /// The service's base URL, e.g. https://spectral.example.com.
        #[arg(long)]
        url: String,
        /// The version that must be live; any when omitted.
        #[arg(long)]
        expect_version: Option<String>,
        /// The git sha that must be live.
        #[arg(long)]
        expect_sha: Option<String>,
        /// The generation that must be live.
        #[arg(long)]
        expect_generation: Option<String>,
        /// A feature /health must show, e.g. outbox=wired or store.backend=postgres
        /// (repeatable).
        #[arg(long, value_name = "FEATURE=VALUE")]
        require: Vec<crate::gate::Requirement>,
        /// How long to keep trying, e.g. 5m or 90s.
        #[arg(long, default_value = "60s", value_parser = crate::gate::parse_duration)]
        timeout: std::time::Duration,
        /// The pause between attempts.
        #[arg(long, default_value = "2s", value_parser = crate::gate::parse_duration)]
        interval: std::time::Duration,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Audit the decision log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Work with a world folder (world.toml plus .rhai predicates).
    World {
        #[command(subcommand)]
        command: WorldCommand,
    },
    /// Decide one action against a world folder and print the decision as the service
    /// returns it.
    Decide {
        /// The world folder.
        #[arg(long)]
        world: PathBuf,
        /// The action, e.g. wire_transfer.release.
        #[arg(long)]
        action: String,
        /// The context as a JSON object.
        #[arg(long)]
        context: String,
        /// Include the per-rule trace.
        #[arg(long)]
        explain: bool,
        /// Echoed back in the decision metadata.
        #[arg(long)]
        correlation_id: Option<String>,
        /// The request time (RFC 3339) bound to `request_time`; now by default.
        #[arg(long)]
        at: Option<String>,
    },
    /// Author rules with the World Agent (configured by SPECTRAL_AGENT_*; docs/agent.md).
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Serve the MCP tools spectral.list_actions and spectral.decide on stdin and stdout,
    /// against a world folder, offline as `spectral decide` decides (no store, no records).
    Mcp {
        /// The world folder.
        #[arg(long)]
        world: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Turn a rule stated in words into a verified candidate for an action of a world folder:
    /// draft, derive cases from the statement alone, verify, repair. Shows each step and the
    /// model's tokens on stderr as they come, prints the candidate with its evidence as JSON
    /// on stdout, and exits 0 only when a candidate was proposed.
    Author {
        /// The world folder.
        #[arg(long)]
        world: PathBuf,
        /// The action the rule belongs to, e.g. refund.issue.
        #[arg(long)]
        action: String,
        /// The rule, as you would say it.
        #[arg(long)]
        text: String,
    },
}

#[derive(Debug, Subcommand)]
enum WorldCommand {
    /// Load, compile and statically check a world; list every problem.
    Check { dir: PathBuf },
    /// Run every rule's cases; report failures with context, expected and actual.
    Test { dir: PathBuf },
    /// Upload a world folder as the draft of a running service, publish it, and optionally
    /// deploy the new version.
    Push {
        dir: PathBuf,
        /// The service's base URL, e.g. http://127.0.0.1:8000.
        #[arg(long)]
        url: String,
        /// An API key with the author scope (and deploy, with --deploy).
        #[arg(long, env = "SPECTRAL_KEY", hide_env_values = true)]
        key: String,
        /// Deploy the published version.
        #[arg(long)]
        deploy: bool,
    },
    /// Upload a world folder as the draft of a running service and replay it over the
    /// decisions the world kept (docs/impact.md); print what it would have changed.
    Replay {
        dir: PathBuf,
        /// The service's base URL, e.g. http://127.0.0.1:8000.
        #[arg(long)]
        url: String,
        /// An API key with the author scope.
        #[arg(long, env = "SPECTRAL_KEY", hide_env_values = true)]
        key: String,
        /// Only decisions decided at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// The most recent decisions to replay (the service's maximum by default).
        #[arg(long)]
        limit: Option<u64>,
        /// How long to wait for the replay to finish, in seconds.
        #[arg(long, default_value_t = 300)]
        wait: u64,
    },
    /// Retire a version on a running service for good: no key may pin it any more and it is
    /// never deployed again. The deployed version cannot be retired; roll back first.
    Retire {
        /// The service's base URL, e.g. http://127.0.0.1:8000.
        #[arg(long)]
        url: String,
        /// An API key with the deploy scope.
        #[arg(long, env = "SPECTRAL_KEY", hide_env_values = true)]
        key: String,
        /// The world, e.g. acme-payments.
        #[arg(long)]
        world: String,
        /// The version to retire.
        #[arg(long)]
        version: u64,
        /// Why, kept with the retirement (at most 1,000 characters).
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create an API key and print its secret once.
    Create {
        /// The world the key is bound to; omit with --operator for a key of every world.
        #[arg(long, required_unless_present = "operator")]
        world: Option<String>,
        /// Comma-separated scopes: decide, read, author, deploy, pin.
        #[arg(long, value_delimiter = ',', default_value = "decide")]
        scopes: Vec<String>,
        /// A key for every world with every scope.
        #[arg(long, conflicts_with = "world")]
        operator: bool,
        /// A note to recognise the key by.
        #[arg(long, default_value = "")]
        label: String,
        /// Refuse the key after this long, e.g. 90d, 12h or 30m; it never expires when omitted.
        #[arg(long, value_parser = parse_lifetime)]
        expires_in: Option<chrono::TimeDelta>,
    },
    /// List a running service's keys (id, world, scopes, created, last used, expiry,
    /// revocation); never a secret.
    List {
        /// The service's base URL, e.g. http://127.0.0.1:8000.
        #[arg(long)]
        url: String,
        /// An operator key.
        #[arg(long, env = "SPECTRAL_KEY", hide_env_values = true)]
        key: String,
    },
    /// Revoke a key on a running service for good; every instance refuses it within the
    /// bound in docs/operations.md ("Keys").
    Revoke {
        /// The service's base URL, e.g. http://127.0.0.1:8000.
        #[arg(long)]
        url: String,
        /// An operator key.
        #[arg(long, env = "SPECTRAL_KEY", hide_env_values = true)]
        key: String,
        /// The id of the key to revoke, e.g. key_0123456789ab.
        id: String,
    },
    /// Give a key a new secret, printed once; the old one stays valid for
    /// SPECTRAL_KEY_ROTATION_OVERLAP_MS.
    Rotate {
        /// The service's base URL, e.g. http://127.0.0.1:8000.
        #[arg(long)]
        url: String,
        /// An operator key.
        #[arg(long, env = "SPECTRAL_KEY", hide_env_values = true)]
        key: String,
        /// The id of the key to rotate.
        id: String,
    },
}

/// A key's lifetime: a whole number followed by d, h, m or s.
fn parse_lifetime(text: &str) -> Result<chrono::TimeDelta, String> {
    let text = text.trim();
    let split = text.len().saturating_sub(1);
    let (n, unit) = text.split_at(split);
    let n: i64 = n
        .parse()
        .map_err(|_| format!("'{text}' is not a lifetime such as 90d, 12h, 30m or 45s"))?;
    let secs = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(format!("'{text}' must end in d, h, m or s")),
    };
    if n <= 0 {
        return Err(format!("'{text}' must be positive"));
    }
    n.checked_mul(secs)
        .and_then(chrono::TimeDelta::try_seconds)
        .ok_or_else(|| format!("'{text}' is too long"))
}

#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// List rows, newest first.
    List {
        /// pending, in_flight, delivered or failed.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        generation: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Put a failed row back to pending, keeping its failure history.
    Replay { id: i64 },
    /// Move the undelivered rows of an old generation to this one (SPECTRAL_GENERATION, or
    /// --to-generation).
    Adopt {
        #[arg(long)]
        from_generation: i64,
        #[arg(long)]
        to_generation: Option<i64>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Walk a world's decision chain in the store (from its checkpoint, when a range was
    /// pruned) or an export file (offline), and report the first broken link.
    Verify {
        /// The world whose stored chain to walk.
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        world: Option<String>,
        /// An export written by `spectral audit export`, checked with no store.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Write a world's records, from its checkpoint through the last decided at or before
    /// --until, to a new file (JSON lines with the chain links), and record the export in the
    /// store so that `audit prune` may remove the range.
    Export {
        #[arg(long)]
        world: String,
        /// RFC 3339, e.g. 2026-11-30T00:00:00Z.
        #[arg(long, value_parser = parse_time)]
        until: chrono::DateTime<chrono::Utc>,
        /// The file to create; an existing file is refused.
        #[arg(long)]
        out: PathBuf,
    },
    /// Remove a world's records decided at or before --until, which must have been exported;
    /// a checkpoint of the last removed link stays, and `audit verify` starts from it.
    Prune {
        #[arg(long)]
        world: String,
        /// RFC 3339, e.g. 2026-11-30T00:00:00Z.
        #[arg(long, value_parser = parse_time)]
        until: chrono::DateTime<chrono::Utc>,
    },
}

/// An RFC 3339 time, as `--until` takes it.
fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("not an RFC 3339 time such as 2026-11-30T00:00:00Z: {e}"))
}

/// Run the command line; the exit code is 0 on success, 1 when a check or test fails (and
/// for `serve`/`api`, when the service stopped on a failure: a dead workers runtime, a stop
/// past its deadline), and 2 when the command could not run.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("spectral-api")
        .build()
        .context("cannot start the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::from_env().context("invalid configuration")?;
    match cli.command {
        Command::Gate {
            url,
            expect_version,
            expect_sha,
            expect_generation,
            require,
            timeout,
            interval,
        } => {
            let gate = crate::gate::Gate {
                url,
                timeout,
                interval,
                expect: crate::gate::Expectations {
                    version: expect_version,
                    git_sha: expect_sha,
                    generation: expect_generation,
                    require,
                },
            };
            return Ok(runtime()?.block_on(crate::gate::main(&gate)));
        }
        Command::Serve | Command::Api => {
            let mode = if matches!(cli.command, Command::Serve) {
                crate::supervisor::Mode::Both
            } else {
                crate::supervisor::Mode::Api
            };
            crate::telemetry::init_tracing(config.log.json, &config.log.filter);
            let stopped = runtime()?.block_on(crate::supervisor::run_until_signal(config, mode))?;
            // A service that stopped on a failure (its workers runtime died, a step of the
            // stop ran past the deadline) exits 1, so that whatever restarts it knows.
            return Ok(match stopped {
                crate::supervisor::Stopped::Clean => ExitCode::SUCCESS,
                _ => ExitCode::FAILURE,
            });
        }
        Command::Workers => {
            crate::telemetry::init_tracing(config.log.json, &config.log.filter);
            runtime()?.block_on(crate::supervisor::run_workers_until_signal(config))?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Outbox { command } => return runtime()?.block_on(outbox(&config, command)),
        Command::Migrate => {
            crate::telemetry::init_tracing(config.log.json, &config.log.filter);
            runtime()?.block_on(async {
                let mut store_config = config.store.clone();
                store_config.migrate_on_start = false;
                let store = Store::connect(&store_config).await?;
                store.migrate().await?;
                println!("migrations applied ({:?})", store.backend());
                store.close().await;
                Ok::<_, anyhow::Error>(())
            })?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Keys {
            command:
                KeysCommand::Create {
                    world,
                    scopes,
                    operator,
                    label,
                    expires_in,
                },
        } => {
            let expires_at = expires_in.map(|d| chrono::Utc::now() + d);
            return runtime()?.block_on(create_key(
                &config, world, scopes, operator, label, expires_at,
            ));
        }
        Command::Keys { command } => return runtime()?.block_on(manage_keys(command)),
        Command::Audit { command } => return audit(&config, command),
        Command::World {
            command:
                WorldCommand::Push {
                    dir,
                    url,
                    key,
                    deploy,
                },
        } => return runtime()?.block_on(push(&dir, &url, &key, deploy)),
        Command::World {
            command:
                WorldCommand::Replay {
                    dir,
                    url,
                    key,
                    since,
                    limit,
                    wait,
                },
        } => {
            let wait = std::time::Duration::from_secs(wait);
            return runtime()?.block_on(replay(&dir, &url, &key, since, limit, wait));
        }
        Command::World {
            command:
                WorldCommand::Retire {
                    url,
                    key,
                    world,
                    version,
                    reason,
                },
        } => return runtime()?.block_on(retire(&url, &key, &world, version, reason)),
        _ => {}
    }
    let sandbox = Sandbox::new(config.sandbox);
    match cli.command {
        Command::Mcp { world } => {
            // Stdout carries the protocol: nothing else may write to it, so no logging.
            let world = load::load(&world, &sandbox).map_err(|e| anyhow!("{e}"))?;
            let folder = crate::mcp::Folder::new(world, sandbox);
            runtime()?.block_on(crate::mcp::serve_stdio(folder))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent {
            command:
                AgentCommand::Author {
                    world,
                    action,
                    text,
                },
        } => runtime()?.block_on(author(&config.agent, &sandbox, &world, action, text)),
        Command::World {
            command: WorldCommand::Check { dir },
        } => Ok(check(&dir, &sandbox)),
        Command::World {
            command: WorldCommand::Test { dir },
        } => Ok(test(&dir, &sandbox)),
        Command::Decide {
            world,
            action,
            context,
            explain,
            correlation_id,
            at,
        } => decide(
            &world,
            &action,
            &context,
            explain,
            correlation_id,
            at,
            &sandbox,
        ),
        // Handled above, before the sandbox is built.
        _ => Ok(ExitCode::from(2)),
    }
}

async fn create_key(
    config: &Config,
    world: Option<String>,
    scopes: Vec<String>,
    operator: bool,
    label: String,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<ExitCode> {
    let scopes: Vec<Scope> = if operator {
        Scope::ALL.to_vec()
    } else {
        scopes
            .iter()
            .map(|s| {
                Scope::parse(s.trim()).ok_or_else(|| {
                    anyhow!("unknown scope '{s}'; expected decide, read, author, deploy or pin")
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let store = Store::connect(&config.store).await?;
    let (id, secret) = auth::generate();
    store
        .create_key(&NewKey {
            id: id.clone(),
            secret_hash: auth::hash_secret(&secret),
            world: if operator { None } else { world.clone() },
            scopes: scopes.clone(),
            label,
            expires_at,
        })
        .await?;
    store.close().await;
    println!("{secret}");
    eprintln!(
        "created {id} for {} with scopes {}{} (the secret above is shown once)",
        world.map_or("every world".to_string(), |w| format!("world '{w}'")),
        scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(","),
        expires_at.map_or(String::new(), |at| format!(
            ", expiring at {}",
            at.to_rfc3339()
        ))
    );
    Ok(ExitCode::SUCCESS)
}

/// `keys list|revoke|rotate`: calls to a running service's `/api/keys` with an operator key.
async fn manage_keys(command: KeysCommand) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()?;
    let at = |url: &str, path: &str| format!("{}/api/keys{path}", url.trim_end_matches('/'));
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    match command {
        KeysCommand::List { url, key } => {
            let keys = answer(client.get(at(&url, "")).bearer_auth(&key).send().await?)
                .await
                .context("listing keys")?;
            println!("id\tworld\tscopes\tcreated\tlast used\texpires\trevoked\tlabel");
            for k in keys["keys"].as_array().into_iter().flatten() {
                let scopes: Vec<String> = k["scopes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect();
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    text(&k["id"]),
                    k["world"].as_str().unwrap_or("*"),
                    scopes.join(","),
                    text(&k["created_at"]),
                    text(&k["last_used_at"]),
                    text(&k["expires_at"]),
                    text(&k["revoked_at"]),
                    text(&k["label"]),
                );
            }
        }
        KeysCommand::Revoke { url, key, id } => {
            let path = format!("/{id}/revoke");
            let revoked = answer(
                client
                    .post(at(&url, &path))
                    .bearer_auth(&key)
                    .send()
                    .await?,
            )
            .await
            .context("revoking")?;
            println!("{id}: revoked at {}", text(&revoked["revoked_at"]));
        }
        KeysCommand::Rotate { url, key, id } => {
            let path = format!("/{id}/rotate");
            let rotated = answer(
                client
                    .post(at(&url, &path))
                    .bearer_auth(&key)
                    .send()
                    .await?,
            )
            .await
            .context("rotating")?;
            println!("{}", text(&rotated["secret"]));
            eprintln!(
                "rotated {id} (the secret above is shown once); the previous secret is accepted until {}",
                text(&rotated["previous_valid_until"])
            );
        }
        KeysCommand::Create { .. } => return Err(anyhow!("keys create runs against the store")),
    }
    Ok(ExitCode::SUCCESS)
}

async fn outbox(config: &Config, command: OutboxCommand) -> anyhow::Result<ExitCode> {
    let mut store_config = config.store.clone();
    store_config.migrate_on_start = false;
    let store = Store::connect(&store_config).await?;
    let result = match command {
        OutboxCommand::List {
            status,
            generation,
            limit,
        } => {
            let status = status
                .map(|s| {
                    OutboxStatus::parse(&s).ok_or_else(|| {
                        anyhow!("unknown status '{s}'; expected pending, in_flight, delivered or failed")
                    })
                })
                .transpose()?;
            let rows = store.outbox_list(status, generation, limit).await?;
            for r in &rows {
                println!(
                    "{}\t{}\tgen {}\t{}\tattempts {}\t{}\t{}",
                    r.id,
                    r.status.as_str(),
                    r.generation,
                    r.event_type,
                    r.attempts,
                    r.world.as_deref().unwrap_or("-"),
                    r.last_error.as_deref().unwrap_or("")
                );
            }
            eprintln!("{} row(s)", rows.len());
            Ok(ExitCode::SUCCESS)
        }
        OutboxCommand::Replay { id } => {
            store.replay(id).await?;
            println!("row {id} is pending again");
            Ok(ExitCode::SUCCESS)
        }
        OutboxCommand::Adopt {
            from_generation,
            to_generation,
        } => {
            let to = to_generation.or(config.outbox.generation).ok_or_else(|| {
                anyhow!("name the adopting generation with --to-generation or SPECTRAL_GENERATION")
            })?;
            let n = store.adopt(from_generation, to).await?;
            println!("{n} row(s) of generation {from_generation} adopted by generation {to}");
            Ok(ExitCode::SUCCESS)
        }
    };
    store.close().await;
    result
}

/// `spectral audit …`: an offline check of a file needs no store or runtime.
fn audit(config: &Config, command: AuditCommand) -> anyhow::Result<ExitCode> {
    if let AuditCommand::Verify {
        file: Some(file), ..
    } = &command
    {
        let report = crate::service::audit::verify_file(file)?;
        return Ok(match report.problem {
            None => {
                println!(
                    "{}: export intact ({} records, {} to {})",
                    report.world, report.records, report.first_seq, report.last_seq
                );
                ExitCode::SUCCESS
            }
            Some(problem) => {
                println!("{}: export broken: {problem}", file.display());
                ExitCode::from(1)
            }
        });
    }
    runtime()?.block_on(async {
        let mut store_config = config.store.clone();
        store_config.migrate_on_start = false;
        let store = Store::connect(&store_config).await?;
        let result = audit_store(&store, command).await;
        store.close().await;
        result
    })
}

async fn audit_store(store: &Store, command: AuditCommand) -> anyhow::Result<ExitCode> {
    use crate::service::audit;
    match command {
        AuditCommand::Verify { world, .. } => {
            let world = world.ok_or_else(|| anyhow!("name --world or --file"))?;
            let report = audit::verify(store, &world).await?;
            let from = report
                .pruned_through
                .map_or(String::new(), |c| format!(", after checkpoint {c}"));
            match report.broken {
                None => {
                    println!("{world}: chain intact ({} records{from})", report.records);
                    Ok(ExitCode::SUCCESS)
                }
                Some(b) => {
                    let decision = if b.decision_id.is_empty() {
                        String::new()
                    } else {
                        format!(" (decision {})", b.decision_id)
                    };
                    println!(
                        "{world}: chain broken at record {}{decision}: {}",
                        b.seq, b.reason
                    );
                    Ok(ExitCode::from(1))
                }
            }
        }
        AuditCommand::Export { world, until, out } => {
            let e = audit::export(store, &world, until, &out).await?;
            println!(
                "{world}: records {} to {} ({}) exported to {} ({}); recorded in the store",
                e.first_seq,
                e.last_seq,
                e.records,
                out.display(),
                e.file_digest
            );
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Prune { world, until } => {
            let p = audit::prune(store, &world, until).await?;
            println!(
                "{world}: {} record(s) removed; the chain continues from checkpoint {} ({})",
                p.removed, p.checkpoint.seq, p.checkpoint.hash
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A service's answer: its JSON body on success, otherwise an error with the status, the
/// problem's detail and every listed problem.
async fn answer(r: reqwest::Response) -> anyhow::Result<serde_json::Value> {
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
    if status.is_success() {
        return Ok(body);
    }
    let mut message = format!(
        "{status}: {}",
        body["detail"].as_str().unwrap_or("no detail")
    );
    for p in body["problems"].as_array().into_iter().flatten() {
        message.push_str(&format!(
            "\n  {}: {}",
            p["at"].as_str().unwrap_or("?"),
            p["message"].as_str().unwrap_or("")
        ));
    }
    Err(anyhow!(message))
}

async fn retire(
    url: &str,
    key: &str,
    world: &str,
    version: u64,
    reason: Option<String>,
) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()?;
    let url = format!(
        "{}/api/worlds/{world}/versions/{version}/retire",
        url.trim_end_matches('/')
    );
    answer(
        client
            .post(url)
            .bearer_auth(key)
            .json(&serde_json::json!({ "reason": reason }))
            .send()
            .await?,
    )
    .await
    .context("retiring")?;
    println!("{world}: retired version {version}");
    Ok(ExitCode::SUCCESS)
}

async fn push(
    dir: &std::path::Path,
    url: &str,
    key: &str,
    deploy: bool,
) -> anyhow::Result<ExitCode> {
    let model = load::load_model(dir).map_err(|e| anyhow!("{e}"))?;
    let base = url.trim_end_matches('/');
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()?;
    let world = &model.world;
    let call = |method: reqwest::Method, path: String| {
        client
            .request(method, format!("{base}{path}"))
            .bearer_auth(key)
    };
    answer(
        call(reqwest::Method::PUT, format!("/api/worlds/{world}/draft"))
            .json(&model)
            .send()
            .await?,
    )
    .await
    .context("uploading the draft")?;
    let published = answer(
        call(
            reqwest::Method::POST,
            format!("/api/worlds/{world}/versions"),
        )
        .send()
        .await?,
    )
    .await
    .context("publishing")?;
    let version = published["version"].as_u64().unwrap_or(0);
    println!("{world}: published version {version}");
    if deploy {
        answer(
            call(
                reqwest::Method::POST,
                format!("/api/worlds/{world}/deployments"),
            )
            .json(&serde_json::json!({ "version": version }))
            .send()
            .await?,
        )
        .await
        .context("deploying")?;
        println!("{world}: deployed version {version}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn replay(
    dir: &std::path::Path,
    url: &str,
    key: &str,
    since: Option<chrono::DateTime<chrono::Utc>>,
    limit: Option<u64>,
    wait: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let model = load::load_model(dir).map_err(|e| anyhow!("{e}"))?;
    let base = url.trim_end_matches('/');
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()?;
    let world = &model.world;
    let call = |method: reqwest::Method, path: String| {
        client
            .request(method, format!("{base}{path}"))
            .bearer_auth(key)
    };
    answer(
        call(reqwest::Method::PUT, format!("/api/worlds/{world}/draft"))
            .json(&model)
            .send()
            .await?,
    )
    .await
    .context("uploading the draft")?;
    eprintln!("{world}: uploaded {} as the draft", dir.display());
    let queued = answer(
        call(
            reqwest::Method::POST,
            format!("/api/worlds/{world}/replays"),
        )
        .json(&serde_json::json!({"version": "draft", "since": since, "limit": limit}))
        .send()
        .await?,
    )
    .await
    .context("queueing the replay")?;
    let id = queued["id"].as_str().unwrap_or_default().to_string();
    let deadline = std::time::Instant::now() + wait;
    let mut shown = None;
    let done = loop {
        let r = answer(
            call(
                reqwest::Method::GET,
                format!("/api/worlds/{world}/replays/{id}"),
            )
            .send()
            .await?,
        )
        .await
        .context("reading the replay")?;
        let progress = (r["status"].clone(), r["processed"].clone());
        if shown.as_ref() != Some(&progress) {
            eprintln!("replay {id}: {}, {} decisions", progress.0, progress.1);
            shown = Some(progress);
        }
        if matches!(r["status"].as_str(), Some("done" | "failed")) {
            break r;
        }
        if std::time::Instant::now() >= deadline {
            return Err(anyhow!(
                "replay {id} did not finish within {}s; read it later at /api/worlds/{world}/replays/{id}",
                wait.as_secs()
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    if done["status"] == "failed" {
        eprintln!(
            "replay {id} failed: {}",
            done["error"].as_str().unwrap_or("no reason given")
        );
        return Ok(ExitCode::from(1));
    }
    print!("{}", replay_table(world, &done));
    Ok(ExitCode::SUCCESS)
}

/// A finished replay as a readable table.
fn replay_table(world: &str, replay: &serde_json::Value) -> String {
    let report = &replay["report"];
    let mut out = format!(
        "{world}: the draft replayed over {} recorded decisions (stopped by {})\n{}\n",
        replay["processed"],
        report["stopped_by"].as_str().unwrap_or("?"),
        report["summary"].as_str().unwrap_or("")
    );
    let rows: Vec<[String; 5]> = report["differences"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let examples: Vec<&str> = d["examples"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_str())
                .collect();
            [
                d["count"].to_string(),
                d["from"].as_str().unwrap_or("").to_string(),
                d["to"].as_str().unwrap_or("").to_string(),
                d["rule"].as_str().unwrap_or("-").to_string(),
                examples.join(", "),
            ]
        })
        .collect();
    if rows.is_empty() {
        return out;
    }
    let header = ["COUNT", "FROM", "TO", "RULE", "EXAMPLES"].map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| match i {
                0 => format!("{cell:>w$}"),
                4 => cell.clone(),
                _ => format!("{cell:<w$}"),
            })
            .collect();
        out.push_str(&format!("  {}\n", cells.join("  ")));
    }
    out
}

fn check(dir: &std::path::Path, sandbox: &Sandbox) -> ExitCode {
    match load::load(dir, sandbox) {
        Ok(world) => {
            let rules: usize = world.modules.iter().map(|m| m.rules.len()).sum();
            println!(
                "{}: ok ({} actions, {} rules)",
                world.model.world,
                world.modules.len(),
                rules
            );
            for m in &world.modules {
                println!("  {} {}", m.manifest.action, m.hash());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            for p in &e.0 {
                eprintln!("{p}");
            }
            eprintln!("{} problem(s) in {}", e.0.len(), dir.display());
            ExitCode::from(1)
        }
    }
}

fn test(dir: &std::path::Path, sandbox: &Sandbox) -> ExitCode {
    let world = match load::load(dir, sandbox) {
        Ok(w) => w,
        Err(e) => {
            for p in &e.0 {
                eprintln!("{p}");
            }
            eprintln!("{} problem(s) in {}", e.0.len(), dir.display());
            return ExitCode::from(1);
        }
    };
    let results = cases::run_cases(&world, sandbox);
    let mut out = std::io::stdout().lock();
    let failed = results.iter().filter(|r| !r.passed).count();
    for r in &results {
        let label = if r.name.is_empty() {
            format!("case {}", r.case)
        } else {
            format!("case {} ({})", r.case, r.name)
        };
        if r.passed {
            let _ = writeln!(out, "PASS {} / {} / {label}", r.action, r.rule);
        } else {
            let _ = writeln!(out, "FAIL {} / {} / {label}", r.action, r.rule);
            let _ = writeln!(
                out,
                "     context:  {}",
                serde_json::Value::Object(r.context.clone())
            );
            let _ = writeln!(
                out,
                "     expected: {}",
                if r.expected { "matched" } else { "not matched" }
            );
            let _ = writeln!(out, "     actual:   {}", r.actual);
        }
    }
    let _ = writeln!(
        out,
        "{}: {} passed, {} failed",
        world.model.world,
        results.len() - failed,
        failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn decide(
    dir: &std::path::Path,
    action: &str,
    context: &str,
    explain: bool,
    correlation_id: Option<String>,
    at: Option<String>,
    sandbox: &Sandbox,
) -> anyhow::Result<ExitCode> {
    let world = load::load(dir, sandbox).map_err(|e| anyhow!("{e}"))?;
    let module = world.module(action).ok_or_else(|| {
        anyhow!(
            "world '{}' has no action '{action}'; it has {}",
            world.model.world,
            world
                .modules
                .iter()
                .map(|m| m.manifest.action.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let request_time = match at {
        Some(text) => chrono::DateTime::parse_from_rfc3339(&text)
            .with_context(|| format!("--at '{text}' is not an RFC 3339 timestamp"))?
            .timestamp(),
        None => chrono::Utc::now().timestamp(),
    };
    let request = worlds::Request {
        context: worlds::ContextJson::Text(context),
        system: SystemValues {
            request_time,
            request_id: uuid::Uuid::now_v7().to_string(),
            caller: "cli".into(),
        },
        correlation_id,
        explain,
    };
    let decision =
        worlds::evaluate(sandbox, module, &request).map_err(|e| anyhow!("--context: {e}"))?;
    println!("{}", serde_json::to_string_pretty(&decision)?);
    Ok(ExitCode::SUCCESS)
}

async fn author(
    config: &crate::config::AgentConfig,
    sandbox: &Sandbox,
    dir: &std::path::Path,
    action: String,
    text: String,
) -> anyhow::Result<ExitCode> {
    use crate::agent::graph::{Graph, RunEvent, RunState, Status, Task};

    // The world must compile as it is before a rule is added to it.
    let world = load::load(dir, sandbox).map_err(|e| anyhow!("{e}"))?;
    let provider = crate::agent::provider::Provider::new(config)?;
    let graph = Graph {
        provider: &provider,
        sandbox,
    };
    let task = Task {
        world: world.model.world.clone(),
        action,
        text,
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    let mut in_tokens = false;
    let mut on = |event: RunEvent| {
        let mut err = std::io::stderr().lock();
        match event {
            RunEvent::NodeStarted { step, node } => {
                let _ = writeln!(err, "[{step}] {} …", node.as_str());
            }
            RunEvent::Token { text, .. } => {
                in_tokens = true;
                let _ = write!(err, "{text}");
                let _ = err.flush();
            }
            RunEvent::Retry {
                attempt, reason, ..
            } => {
                let _ = writeln!(err, "\n    retrying (attempt {}): {reason}", attempt + 1);
            }
            RunEvent::NodeFinished {
                step,
                node,
                summary,
            } => {
                if std::mem::take(&mut in_tokens) {
                    let _ = writeln!(err);
                }
                let _ = writeln!(err, "[{step}] {}: {summary}", node.as_str());
            }
        }
    };
    let state = graph
        .run(
            RunState::new(task, crate::agent::graph::Limits::from(config)),
            &world.model,
            &cancel,
            &mut on,
            &mut |_| {},
        )
        .await;
    if let Some(evidence) = state.evidence() {
        println!("{}", serde_json::to_string_pretty(&evidence)?);
        eprintln!(
            "proposed '{}': {}, {} repair(s), {} model call(s), {} tokens",
            evidence.rule.id,
            evidence.checks,
            evidence.repairs,
            evidence.usage.calls,
            evidence.usage.tokens()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "no candidate: the run ended {}", state.status.code());
    match &state.status {
        Status::Refused { reason } => {
            let _ = writeln!(err, "  {reason}");
        }
        Status::ProviderFailed { message, .. } => {
            let _ = writeln!(err, "  {message}");
        }
        _ => {}
    }
    for (i, failure) in state.failures.iter().enumerate() {
        let _ = writeln!(err, "verification {}:", i + 1);
        for d in failure {
            let _ = writeln!(err, "  - {} ({:?}): {}", d.at, d.class, d.message);
        }
    }
    Ok(ExitCode::from(1))
}
