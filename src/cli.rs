//! The command line: `spectral world check|test`, `spectral decide`. Glue only: every
//! command is a thin layer over the library, and the only place besides `main` where
//! `anyhow` is used.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context as _};
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::sandbox::Sandbox;
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
}

#[derive(Debug, Subcommand)]
enum WorldCommand {
    /// Load, compile and statically check a world; list every problem.
    Check { dir: PathBuf },
    /// Run every rule's cases; report failures with context, expected and actual.
    Test { dir: PathBuf },
}

/// Run the command line; the exit code is 0 on success, 1 when a check or test fails, and 2
/// when the command could not run.
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::from_env().context("invalid configuration")?;
    let sandbox = Sandbox::new(config.sandbox);
    match cli.command {
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
    }
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

#[allow(clippy::too_many_arguments)]
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
