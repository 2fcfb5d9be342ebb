//! The `probe` command line. Errors are reported as one line on stderr with
//! exit code 2; nothing here panics on bad input.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use probe::inspect::{tensor_frame, Inspection};
use probe::table::{self, Format};

#[derive(Parser)]
#[command(
    name = "probe",
    version,
    about = "Tell what is inside transformer checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Say what a checkpoint is, from its headers alone (no weights are read).
    Inspect {
        /// A .safetensors file, a folder holding one, a sharded checkpoint
        /// (its index or its folder), or a folder of a run's checkpoints.
        #[arg(required = true)]
        models: Vec<PathBuf>,
        /// table, json, csv or parquet (default: from --out's extension, else table).
        #[arg(long, short = 'f')]
        format: Option<Format>,
        /// Write to this file (whole or not at all) instead of stdout.
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // A closed pipe (`probe inspect … | head`) is not an error worth a line.
            if is_broken_pipe(&error) {
                return ExitCode::SUCCESS;
            }
            eprintln!("probe: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect {
            models,
            format,
            out,
        } => inspect(&models, format, out),
    }
}

fn inspect(models: &[PathBuf], format: Option<Format>, out: Option<PathBuf>) -> Result<()> {
    let mut inspections = Vec::new();
    for model in models {
        for checkpoint in probe::source::open_all(model)? {
            let mut inspection = Inspection::of(&checkpoint);
            inspection.checkpoint = Some(checkpoint.label.clone());
            inspections.push(inspection);
        }
    }
    // A single checkpoint needs no label: its JSON is exactly the documented object.
    if inspections.len() == 1 {
        inspections[0].checkpoint = None;
    }
    let format = Format::resolve(format, out.as_deref());
    match format {
        Format::Json => {
            let json = if inspections.len() == 1 {
                serde_json::to_string_pretty(&inspections[0])?
            } else {
                serde_json::to_string_pretty(&inspections)?
            };
            emit_text(out.as_deref(), &json)
        }
        Format::Table if out.is_none() => {
            let mut text = String::new();
            for inspection in &inspections {
                let frame = tensor_frame(std::slice::from_ref(inspection))?;
                text.push_str(&inspection.summary());
                text.push('\n');
                text.push_str(&table::render(&frame));
                text.push('\n');
            }
            emit_text(None, text.trim_end())
        }
        _ => {
            let mut frame = tensor_frame(&inspections)?;
            let summaries: Vec<serde_json::Value> = inspections
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "checkpoint": i.checkpoint, "family": i.family, "num_layers": i.num_layers,
                        "hidden_size": i.hidden_size, "vocab_size": i.vocab_size,
                        "tied_embeddings": i.tied_embeddings, "params": i.params,
                    })
                })
                .collect();
            let metadata = vec![
                ("probe.command".to_string(), "inspect".to_string()),
                (
                    "probe.version".to_string(),
                    env!("CARGO_PKG_VERSION").to_string(),
                ),
                (
                    "probe.models".to_string(),
                    serde_json::to_string(&summaries)?,
                ),
            ];
            table::write_frame(&mut frame, format, out.as_deref(), &metadata)?;
            Ok(())
        }
    }
}

/// Text to stdout, or to a file written whole.
fn emit_text(out: Option<&std::path::Path>, text: &str) -> Result<()> {
    match out {
        Some(path) => table::write_atomically(path, |file| {
            writeln!(file, "{text}").map_err(|source| table::TableError::Io {
                path: path.to_path_buf(),
                source,
            })
        })
        .map_err(Into::into),
        None => {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{text}")?;
            Ok(())
        }
    }
}
