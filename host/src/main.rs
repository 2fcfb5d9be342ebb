//! The `probe` command line. Errors are reported as one line on stderr with
//! exit code 2; nothing here panics on bad input.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use probe::inspect::{tensor_frame, Inspection};
use probe::progress::Progress;
use probe::run::{RunOutput, Shard};
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
        /// A .safetensors or .gguf file, a folder holding one, a sharded
        /// checkpoint (its index, its folder, or one of its GGUF splits), or
        /// a folder of a run's checkpoints.
        #[arg(required = true)]
        models: Vec<PathBuf>,
        /// table, json, csv or parquet (default: from --out's extension, else table).
        #[arg(long, short = 'f')]
        format: Option<Format>,
        /// Write to this file (whole or not at all) instead of stdout.
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
    },
    /// Run a probe plugin on one or more checkpoints and write its table.
    Run(RunArgs),
    /// List the plugins found, or show one plugin's parameters.
    Plugins {
        #[command(subcommand)]
        command: Option<PluginsCommand>,
        #[arg(long = "plugin-dir", global = true)]
        plugin_dirs: Vec<PathBuf>,
    },
    /// Run the model on a text: top-K next-token predictions per position,
    /// the loss on the text, and the residual norm after every block.
    Forward(ForwardArgs),
    /// Write a copy of a checkpoint with its blocks permuted (a test case for
    /// layer-order recovery); the permutation goes into the file's metadata.
    Shuffle {
        model: PathBuf,
        /// Seed of the permutation (the same seed gives the same order).
        #[arg(long)]
        seed: u64,
        /// Folder for `model.safetensors` (config and tokenizer copied along).
        #[arg(long, short = 'o')]
        out: PathBuf,
        /// Per-block settings of the config (Gemma 3's sliding or full
        /// attention): `moved` with their blocks (the config still describes
        /// each block), or `kept` as they were, so they now describe
        /// positions (what renaming a checkpoint's tensors does).
        #[arg(long, value_enum, default_value = "moved")]
        config: ConfigArg,
    },
    /// Write a checkpoint (a GGUF file: dequantized to F32, under Hugging
    /// Face names) as a safetensors folder with its config and tokenizer.
    Convert {
        model: PathBuf,
        /// The folder to write `model.safetensors`, `config.json` and the
        /// tokenizer files into.
        #[arg(long, short = 'o')]
        out: PathBuf,
        /// Write every float tensor as this type (rounded to nearest, ties
        /// to even); default: as stored (GGUF block types as F32).
        #[arg(long)]
        dtype: Option<CastArg>,
    },
    /// Draw result tables as one self-contained HTML page of SVG charts.
    Report {
        /// Parquet files written by `probe run` (their companions are found
        /// through the metadata).
        #[arg(required = true)]
        results: Vec<PathBuf>,
        /// The HTML page to write.
        #[arg(long, short = 'o')]
        out: PathBuf,
        /// Also write each chart as a PNG into this folder.
        #[arg(long, value_name = "DIR")]
        png: Option<PathBuf>,
        /// The metric of heat maps and by-layer charts (spectral: pr_rank_ratio).
        #[arg(long)]
        metric: Option<String>,
    },
    /// Join the part files of a `probe run --shard` sweep into one table.
    Merge {
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        #[arg(long, short = 'f')]
        format: Option<Format>,
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ForwardArgs {
    /// A checkpoint (file, folder or shard index) with its config.json.
    model: PathBuf,
    /// The text, tokenized with the checkpoint's tokenizer.json.
    #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
    text: Option<String>,
    /// Token ids instead of text: `--tokens 1,2,3`.
    #[arg(long, value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    /// Wrap the text in the model's chat template as a user message.
    #[arg(long, requires = "text")]
    chat: bool,
    /// Predictions shown per position.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// cpu, or cuda (fails if the CUDA provider cannot be registered).
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
    /// ONNX Runtime threads (default: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The most memory converted weights (F16, BF16, quantized → f32) may
    /// take at once: `64MB`, `8GiB`, or `none`. Default: a quarter of the
    /// memory free now (the cgroup's, under Slurm or Kubernetes). A model
    /// larger than the budget streams through it block by block.
    #[arg(long, value_name = "SIZE")]
    memory_budget: Option<probe::memory::MemoryBudget>,
    /// table or json.
    #[arg(long, short = 'f')]
    format: Option<Format>,
    /// Write to this file (whole or not at all) instead of stdout.
    #[arg(long, short = 'o')]
    out: Option<PathBuf>,
    /// Benchmarks: run the pass this many more times and print only the
    /// median seconds per pass.
    #[arg(long, hide = true)]
    time_passes: Option<usize>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ConfigArg {
    Moved,
    Kept,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CastArg {
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

impl DeviceArg {
    fn device(self) -> probe::forward::Device {
        match self {
            DeviceArg::Cpu => probe::forward::Device::Cpu,
            DeviceArg::Cuda => probe::forward::Device::Cuda,
        }
    }

    fn as_str(self) -> &'static str {
        self.device().as_str()
    }
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// What a plugin measures and the parameters it takes.
    Info { name: String },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// A plugin name (see `probe plugins`) or a path to its shared library.
    #[arg(long)]
    plugin: String,
    /// Checkpoints: files, folders, shard indexes or run folders.
    #[arg(required = true)]
    models: Vec<PathBuf>,
    /// A plugin parameter, key=value (repeatable).
    #[arg(long = "param", short = 'p', value_name = "KEY=VALUE")]
    params: Vec<String>,
    #[arg(long, short = 'f')]
    format: Option<Format>,
    #[arg(long, short = 'o')]
    out: Option<PathBuf>,
    /// Extra folder to look for plugins in (repeatable).
    #[arg(long = "plugin-dir")]
    plugin_dirs: Vec<PathBuf>,
    /// Run slice I of N (0-based) and write a part file beside --out; also
    /// taken from Slurm array and Kubernetes indexed-Job variables.
    #[arg(long)]
    shard: Option<Shard>,
    /// Run the plugin in a child process, so a crashing plugin cannot take probe down.
    #[arg(long)]
    isolate: bool,
    /// No progress or log lines (warnings and errors still show).
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Also write an HTML report of the result (as `probe report` does).
    #[arg(long, value_name = "HTML")]
    report: Option<PathBuf>,
    /// Where the plugin's forward passes run: cpu, or cuda (fails with
    /// ONNX Runtime's reason if the CUDA provider cannot be registered;
    /// never falls back to the CPU).
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
    /// ONNX Runtime threads for the plugin's forward passes (default: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The most memory converted weights (F16, BF16, quantized → f32) may
    /// take at once: `64MB`, `8GiB`, or `none`. Default: a quarter of the
    /// memory free now (the cgroup's, under Slurm or Kubernetes). A model
    /// larger than the budget streams through it block by block.
    #[arg(long, value_name = "SIZE")]
    memory_budget: Option<probe::memory::MemoryBudget>,
    /// Internal: the isolated child writes its table here.
    #[arg(long, hide = true)]
    isolated_result: Option<PathBuf>,
}

fn main() -> ExitCode {
    probe::guard::install_quiet_hook();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // A closed pipe (`probe inspect … | head`) is not an error worth a line.
            if is_broken_pipe(&error) {
                return ExitCode::SUCCESS;
            }
            if error.is::<AlreadyReported>() {
                return ExitCode::from(2);
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
        Command::Run(args) => run_plugin(args),
        Command::Plugins {
            command,
            plugin_dirs,
        } => plugins(command, &plugin_dirs),
        Command::Forward(args) => forward(args),
        Command::Shuffle {
            model,
            seed,
            out,
            config,
        } => {
            let checkpoint = probe::store::Checkpoint::open(&model)?;
            let config = match config {
                ConfigArg::Moved => probe::shuffle::BlockConfig::Moved,
                ConfigArg::Kept => probe::shuffle::BlockConfig::Kept,
            };
            let stored = probe::shuffle::write_shuffled(&checkpoint, seed, config, &out)?;
            eprintln!(
                "probe: wrote {} with blocks stored in the order {:?} (true depth of each stored block)",
                out.join("model.safetensors").display(),
                stored
            );
            Ok(())
        }
        Command::Convert { model, out, dtype } => {
            let checkpoint = probe::store::Checkpoint::open(&model)?;
            let cast = dtype.map(|d| match d {
                CastArg::F32 => probe::Dtype::F32,
                CastArg::Bf16 => probe::Dtype::BF16,
                CastArg::F16 => probe::Dtype::F16,
            });
            let tensors = probe::convert::to_safetensors(&checkpoint, cast, &out)?;
            eprintln!(
                "probe: wrote {tensors} tensors to {}",
                out.join("model.safetensors").display()
            );
            Ok(())
        }
        Command::Report {
            results,
            out,
            png,
            metric,
        } => {
            let tables = results
                .iter()
                .map(|path| Ok(report_table(path, RunOutput::read_parquet(path)?)))
                .collect::<Result<Vec<_>>>()?;
            write_report(&tables, &out, png.as_deref(), metric)
        }
        Command::Merge { parts, format, out } => {
            let merged = probe::run::merge(&parts)?;
            write_output(merged, format, out.as_deref())
        }
    }
}

fn forward(args: ForwardArgs) -> Result<()> {
    use probe::forward::{summary::Summary, Capture, Engine, EngineOptions, Request};
    let format = Format::resolve(args.format, args.out.as_deref());
    if !matches!(format, Format::Table | Format::Json) {
        bail!("probe forward writes a table or json, not {format:?}");
    }
    let checkpoint = probe::store::Checkpoint::open(&args.model)?;
    let codec = probe::codec::open(&checkpoint);
    let tokens = match (&args.tokens, &args.text) {
        (Some(tokens), _) => tokens.clone(),
        (None, Some(text)) => {
            let codec = codec.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
            if args.chat {
                codec.encode_chat(text)?
            } else {
                codec.encode(text)?
            }
        }
        (None, None) => bail!("give --text or --tokens"),
    };
    let device = args.device.device();
    let mut engine = Engine::open(
        &checkpoint,
        EngineOptions {
            device,
            threads: args.threads,
            memory_budget: probe::memory::resolve(args.memory_budget),
        },
    )?;
    let capture = Capture {
        residuals: true,
        logits: engine.has_head(),
        ..Capture::default()
    };
    let request = Request {
        tokens: &tokens,
        capture,
        ..Request::default()
    };
    let trace = engine.run(&request)?;
    if let Some(passes) = args.time_passes {
        let mut seconds: Vec<f64> = (0..passes.max(1))
            .map(|_| {
                let start = std::time::Instant::now();
                engine.run(&request).map(|_| start.elapsed().as_secs_f64())
            })
            .collect::<Result<_, _>>()?;
        seconds.sort_by(f64::total_cmp);
        println!("{}", seconds[seconds.len() / 2]);
        return Ok(());
    }
    let mut summary = Summary::new(
        checkpoint.label.clone(),
        engine.arch.family.to_string(),
        device.as_str().to_string(),
        &trace,
        codec.as_ref().ok(),
        args.top_k,
    );
    summary.weights = Some(engine.weight_stats());
    let text = match format {
        Format::Json => serde_json::to_string_pretty(&summary)? + "\n",
        _ => summary.render(),
    };
    match &args.out {
        Some(path) => table::write_atomically(path, |file| {
            file.write_all(text.as_bytes())
                .map_err(|cause| table::TableError::Io {
                    path: path.clone(),
                    cause,
                })
        })?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(())
}

/// Set by Ctrl-C; plugins poll it and stop. A second Ctrl-C exits at once.
static CANCEL: AtomicBool = AtomicBool::new(false);

fn run_plugin(args: RunArgs) -> Result<()> {
    let shard = match args.shard {
        Some(shard) => Some(shard),
        None => Shard::from_env(|name| std::env::var(name).ok()).map_err(anyhow::Error::msg)?,
    };
    let dirs = probe::plugin::search_dirs(&args.plugin_dirs);
    let path = probe::plugin::find(&args.plugin, &dirs)?;
    if shard.is_some() && args.out.is_none() && args.isolated_result.is_none() {
        bail!("--shard writes a part file named after --out: give --out");
    }
    let engine = probe::forward::EngineOptions {
        device: args.device.device(),
        threads: args.threads,
        memory_budget: probe::memory::resolve(args.memory_budget),
    };
    // A device that cannot be used fails the run before any work (and
    // before a plugin that makes no forward pass could hide it).
    if engine.device != probe::forward::Device::Cpu {
        probe::forward::engine::check_options(engine)?;
    }
    let output = if args.isolate {
        run_isolated(&args, &path, shard)?
    } else {
        let plugin = probe::plugin::load(&path)?;
        let _ = ctrlc::set_handler(|| {
            if CANCEL.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("probe: stopping (Ctrl-C again to quit now)");
        });
        let progress = Progress::new(&plugin.name, args.quiet);
        probe::run::execute(
            plugin,
            &args.models,
            &args.params,
            probe::run::RunOptions { shard, engine },
            &progress,
            &CANCEL,
        )?
    };
    if let Some(result) = &args.isolated_result {
        return Ok(output.write_parquet(result)?);
    }
    match shard {
        Some(shard) => {
            let out = args.out.as_deref().expect("checked above");
            let part = shard.part_path(out);
            output.write_parquet(&part)?;
            if !args.quiet {
                eprintln!("probe: wrote part {shard} to {}", part.display());
            }
            Ok(())
        }
        None => {
            let table = args.report.as_ref().map(|_| {
                let name = args
                    .out
                    .as_deref()
                    .and_then(|o| o.file_name())
                    .map_or_else(|| args.plugin.clone(), |n| n.to_string_lossy().into_owned());
                report_table(std::path::Path::new(&name), output.clone())
            });
            write_output(output, args.format, args.out.as_deref())?;
            match (table, &args.report) {
                (Some(table), Some(html)) => write_report(&[table], html, None, None),
                _ => Ok(()),
            }
        }
    }
}

/// A result table as the report sees it: frame, companions and who made it.
fn report_table(path: &std::path::Path, output: RunOutput) -> probe_reports::Table {
    let get = |key: &str| {
        output
            .metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    probe_reports::Table {
        name: path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        plugin: get("probe.plugin"),
        plugin_version: get("probe.plugin_version"),
        params: get("probe.params"),
        frame: output.frame,
        companions: output.companions,
    }
}

fn write_report(
    tables: &[probe_reports::Table],
    out: &std::path::Path,
    png: Option<&std::path::Path>,
    metric: Option<String>,
) -> Result<()> {
    let options = probe_reports::Options { metric };
    let drawn = probe_reports::render(tables, &options)?;
    if let Some(dir) = png {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("{}: cannot create the folder: {e}", dir.display()))?;
        for (t, (table, charts)) in drawn.iter().enumerate() {
            let stem = table.name.split('.').next().unwrap_or("table").to_string();
            for (c, chart) in charts.iter().enumerate() {
                chart
                    .spec
                    .png(&dir.join(format!("{t:02}-{stem}-{c}.png")))?;
            }
        }
    }
    let html = probe_reports::page("probe report", &drawn);
    table::write_atomically(out, |file| {
        file.write_all(html.as_bytes())
            .map_err(|cause| table::TableError::Io {
                path: out.to_path_buf(),
                cause,
            })
    })?;
    Ok(())
}

/// Run the same command in a child process and read back its table. A
/// plugin that segfaults or aborts kills only the child.
fn run_isolated(
    args: &RunArgs,
    plugin: &std::path::Path,
    shard: Option<Shard>,
) -> Result<RunOutput> {
    let scratch = tempfile::tempdir()?;
    let result = scratch.path().join("result.parquet");
    let mut child = std::process::Command::new(std::env::current_exe()?);
    child.arg("run").arg("--plugin").arg(plugin);
    child.args(&args.models);
    for param in &args.params {
        child.arg("--param").arg(param);
    }
    if let Some(shard) = shard {
        child.arg("--shard").arg(shard.to_string());
    }
    if args.quiet {
        child.arg("--quiet");
    }
    child.arg("--device").arg(args.device.as_str());
    child.arg("--threads").arg(args.threads.to_string());
    if let Some(budget) = args.memory_budget {
        child.arg("--memory-budget").arg(budget.to_string());
    }
    child.arg("--isolated-result").arg(&result);
    let status = child.status()?;
    if !status.success() {
        if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
            bail!(
                "plugin `{}` crashed with signal {signal} ({}) in its isolated process; probe itself is unaffected",
                args.plugin,
                signal_name(signal)
            );
        }
        // The child has printed its own one-line error.
        return Err(AlreadyReported.into());
    }
    Ok(RunOutput::read_parquet(&result)?)
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        _ => "a signal",
    }
}

/// An error the isolated child already printed.
#[derive(Debug)]
struct AlreadyReported;
impl std::fmt::Display for AlreadyReported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the isolated run failed")
    }
}
impl std::error::Error for AlreadyReported {}

/// The main table, then each companion beside it (`STEM.NAME.EXT`); on a
/// terminal, companions follow the main table under their names.
fn write_output(
    output: RunOutput,
    format: Option<Format>,
    out: Option<&std::path::Path>,
) -> Result<()> {
    let format = Format::resolve(format, out);
    if let (Format::Parquet, Some(out)) = (format, out) {
        // Records the companions in the metadata, so `probe report` and
        // `probe merge` find them.
        return Ok(output.write_parquet(out)?);
    }
    let RunOutput {
        mut frame,
        companions,
        metadata,
    } = output;
    table::write_frame(&mut frame, format, out, &metadata)?;
    for (name, mut table) in companions {
        match out {
            Some(out) => {
                let path = probe::run::companion_path(out, &name);
                table::write_frame(&mut table, format, Some(&path), &metadata)?;
            }
            None if format == Format::Table => {
                println!("\n{name}:\n{}", table::render(&table));
            }
            None => eprintln!("probe: warning: table `{name}` is written only with --out"),
        }
    }
    Ok(())
}

fn plugins(command: Option<PluginsCommand>, plugin_dirs: &[PathBuf]) -> Result<()> {
    let dirs = probe::plugin::search_dirs(plugin_dirs);
    match command {
        None => {
            let (found, failures) = probe::plugin::discover(&dirs);
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
            table.set_header(["name", "version", "summary", "path"]);
            for plugin in &found {
                table.add_row([
                    plugin.name.as_str(),
                    plugin.version.as_str(),
                    plugin.summary.as_str(),
                    &plugin.path.display().to_string(),
                ]);
            }
            println!("{table}");
            for failure in failures {
                eprintln!("probe: warning: {failure}");
            }
            Ok(())
        }
        Some(PluginsCommand::Info { name }) => {
            let plugin = probe::plugin::load(&probe::plugin::find(&name, &dirs)?)?;
            println!("{} {} — {}", plugin.name, plugin.version, plugin.summary);
            println!("{}", plugin.path.display());
            println!("plugin ABI {}", plugin.abi);
            if !plugin.description.is_empty() {
                println!("\n{}", plugin.description.trim_end());
            }
            if plugin.params.is_empty() {
                println!("\nNo parameters.");
                return Ok(());
            }
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
            table.set_header(["parameter", "type", "default", "help"]);
            for spec in &plugin.params {
                let kind = if spec.choices.is_empty() {
                    spec.kind.as_str().to_string()
                } else {
                    spec.choices.join("|")
                };
                table.add_row([
                    spec.name.clone(),
                    kind,
                    spec.default.clone().unwrap_or_else(|| "—".into()),
                    spec.help.clone(),
                ]);
            }
            println!("\nParameters (--param NAME=VALUE):\n{table}");
            Ok(())
        }
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
                cause: source,
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
