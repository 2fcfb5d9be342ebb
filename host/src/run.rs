//! `probe run`: one plugin over one or more checkpoints, optionally a
//! deterministic slice of the work (`--shard I/N`), into one table.
//! `probe merge`: part files back into that table.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use polars::prelude::*;

use crate::forward::EngineOptions;
use crate::host_api::{CallError, RunContext};
use crate::plugin::LoadedPlugin;
use crate::progress::Progress;
use crate::source::Located;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("plugin `{plugin}`: {cause}")]
    Params {
        plugin: String,
        cause: probe_contract::ParamError,
    },
    #[error("plugin `{plugin}` {} on {checkpoint}: {}", cause.verb(), cause.detail())]
    Call {
        plugin: String,
        checkpoint: String,
        cause: CallError,
    },
    #[error("plugin `{plugin}`: {problem}")]
    Output { plugin: String, problem: String },
    #[error(transparent)]
    Store(#[from] crate::StoreError),
    #[error("{0}")]
    Shard(String),
    #[error("{}: {problem}", path.display())]
    Part { path: PathBuf, problem: String },
}

/// A 0-based slice `index` of `count` equal parts of the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = s
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if count > 0 && index < count => Ok(Shard { index, count }),
            _ => Err(format!("`{s}` is not a shard I/N with 0 ≤ I < N")),
        }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The shard a Slurm array task or a Kubernetes indexed Job is, if any.
    ///
    /// Slurm: `SLURM_ARRAY_TASK_ID` − `SLURM_ARRAY_TASK_MIN` of
    /// `SLURM_ARRAY_TASK_COUNT`. Kubernetes: `JOB_COMPLETION_INDEX` of
    /// `PROBE_SHARD_COUNT` (Kubernetes does not export the completion count).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Shard>, String> {
        let number = |name: &str| -> Result<Option<usize>, String> {
            match var(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("{name}={v} is not a number")),
            }
        };
        if let (Some(id), Some(count)) = (
            number("SLURM_ARRAY_TASK_ID")?,
            number("SLURM_ARRAY_TASK_COUNT")?,
        ) {
            let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id.checked_sub(min).filter(|&i| i < count).ok_or_else(|| {
                format!("Slurm task {id} (min {min}) is outside an array of {count}")
            })?;
            return Ok(Some(Shard { index, count }));
        }
        if let Some(index) = number("JOB_COMPLETION_INDEX")? {
            return match number("PROBE_SHARD_COUNT")? {
                Some(count) if index < count => Ok(Some(Shard { index, count })),
                Some(count) => Err(format!("JOB_COMPLETION_INDEX={index} is not below PROBE_SHARD_COUNT={count}")),
                None => Err("JOB_COMPLETION_INDEX is set but PROBE_SHARD_COUNT is not: set it to the Job's completions, or pass --shard".into()),
            };
        }
        Ok(None)
    }

    /// The contiguous block of `total` global work items this shard runs.
    /// Contiguous (not round-robin) so that parts concatenated in shard
    /// order are exactly the unsharded table.
    pub fn range(&self, total: usize) -> std::ops::Range<usize> {
        let start = total * self.index / self.count;
        let end = total * (self.index + 1) / self.count;
        start..end
    }

    /// `spectral.parquet` → `spectral.part-0002-of-0008.parquet`.
    pub fn part_path(&self, out: &Path) -> PathBuf {
        let stem = out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.with_file_name(format!(
            "{stem}.part-{:04}-of-{:04}.parquet",
            self.index, self.count
        ))
    }
}

/// A finished run: the table, the companion tables the plugin emitted
/// (written beside it as `STEM.NAME.EXT`), and what to record in parquet
/// metadata.
#[derive(Clone)]
pub struct RunOutput {
    pub frame: DataFrame,
    pub companions: Vec<(String, DataFrame)>,
    pub metadata: Vec<(String, String)>,
}

/// `out/spectral.parquet` + `singular_values` → `out/spectral.singular_values.parquet`.
pub fn companion_path(out: &Path, name: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = match out.extension() {
        Some(ext) => format!("{stem}.{name}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{name}"),
    };
    out.with_file_name(file)
}

const COMPANIONS_KEY: &str = "probe.companions";

impl RunOutput {
    /// Write as parquet: the main table at `path`, companions beside it.
    pub fn write_parquet(mut self, path: &Path) -> Result<(), crate::table::TableError> {
        let names: Vec<&str> = self.companions.iter().map(|(n, _)| n.as_str()).collect();
        self.metadata.retain(|(k, _)| k != COMPANIONS_KEY);
        self.metadata.push((
            COMPANIONS_KEY.into(),
            serde_json::to_string(&names).unwrap_or_default(),
        ));
        for (name, frame) in &mut self.companions {
            crate::table::write_frame(
                frame,
                crate::table::Format::Parquet,
                Some(&companion_path(path, name)),
                &self.metadata,
            )?;
        }
        crate::table::write_frame(
            &mut self.frame,
            crate::table::Format::Parquet,
            Some(path),
            &self.metadata,
        )
    }

    /// Read what `write_parquet` wrote.
    pub fn read_parquet(path: &Path) -> Result<RunOutput, RunError> {
        let (frame, metadata) = read_parquet(path)?;
        let names: Vec<String> = metadata
            .iter()
            .find(|(k, _)| k == COMPANIONS_KEY)
            .and_then(|(_, v)| serde_json::from_str(v).ok())
            .unwrap_or_default();
        let mut companions = Vec::new();
        for name in names {
            if !crate::host_api::is_companion_name(&name) {
                return Err(RunError::Part {
                    path: path.to_path_buf(),
                    problem: format!("names a companion table `{name}` that is not a plain name"),
                });
            }
            let (table, _) = read_parquet(&companion_path(path, &name))?;
            companions.push((name, table));
        }
        Ok(RunOutput {
            frame,
            companions,
            metadata,
        })
    }
}

/// Append `part`'s companions to `acc`, by name, in first-seen order.
fn append_companions(
    acc: &mut Vec<(String, DataFrame)>,
    part: Vec<(String, DataFrame)>,
    plugin: &LoadedPlugin,
) -> Result<(), RunError> {
    for (name, frame) in part {
        match acc.iter_mut().find(|(n, _)| *n == name) {
            Some((_, existing)) => {
                existing.vstack_mut(&frame).map_err(|e| RunError::Output {
                    plugin: plugin.name.clone(),
                    problem: format!(
                        "table `{name}` has different columns for different checkpoints ({e})"
                    ),
                })?;
            }
            None => acc.push((name, frame)),
        }
    }
    Ok(())
}

/// Labels for the checkpoints: their names, or their paths when names repeat.
fn labels(checkpoints: &[Located]) -> Vec<String> {
    let names: Vec<&str> = checkpoints.iter().map(|c| c.label.as_str()).collect();
    let unique = names
        .iter()
        .enumerate()
        .all(|(i, n)| !names[..i].contains(n));
    if unique {
        names.into_iter().map(String::from).collect()
    } else {
        checkpoints
            .iter()
            .map(|c| c.path.display().to_string())
            .collect()
    }
}

/// Where and how a run's plugin calls execute.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    pub shard: Option<Shard>,
    /// Device and threads of every forward pass the plugin makes.
    pub engine: EngineOptions,
}

/// Run `plugin` over every checkpoint found at `models`.
///
/// Checkpoints are opened one at a time: each is mapped, run and dropped
/// (with its forward engine and its converted weights) before the next is
/// opened, so memory does not grow with the number of checkpoints. All are
/// opened once up front, headers only, so a bad file fails the run before
/// any work.
pub fn execute(
    plugin: &LoadedPlugin,
    models: &[PathBuf],
    given_params: &[String],
    options: RunOptions,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<RunOutput, RunError> {
    let params =
        probe_contract::params::resolve(&plugin.params, given_params).map_err(|source| {
            RunError::Params {
                plugin: plugin.name.clone(),
                cause: source,
            }
        })?;
    let params_json = serde_json::Value::Object(params).to_string();
    let mut checkpoints = Vec::new();
    for model in models {
        checkpoints.extend(crate::source::locate_all(model)?);
    }
    for located in &checkpoints {
        drop(located.open()?);
    }
    let labels = labels(&checkpoints);
    let call_error = |index: usize, source| RunError::Call {
        plugin: plugin.name.clone(),
        checkpoint: labels[index].clone(),
        cause: source,
    };
    // One checkpoint's context at a time, dropped when `body` returns.
    let with_context = |index: usize,
                        body: &mut dyn FnMut(&RunContext<'_>) -> Result<(), RunError>|
     -> Result<(), RunError> {
        let checkpoint = checkpoints[index].open()?;
        let context = RunContext::new(&checkpoint, progress, cancel, options.engine);
        body(&context)
    };

    // The global work list: (checkpoint, item) in checkpoint order.
    let mut counts = Vec::with_capacity(checkpoints.len());
    for index in 0..checkpoints.len() {
        with_context(index, &mut |context| {
            counts.push(
                context
                    .work_items(plugin, &params_json)
                    .map_err(|e| call_error(index, e))?,
            );
            Ok(())
        })?;
    }
    let total: usize = counts.iter().sum();
    let selected = options.shard.map_or(0..total, |s| s.range(total));

    let mut frame: Option<DataFrame> = None;
    let mut companions: Vec<(String, DataFrame)> = Vec::new();
    let several = checkpoints.len() > 1;
    // The weight cache's counters per checkpoint that ran forward passes.
    let mut weights = Vec::new();
    let mut offset = 0;
    for index in 0..checkpoints.len() {
        let items: Vec<usize> = (0..counts[index])
            .filter(|item| selected.contains(&(offset + item)))
            .collect();
        offset += counts[index];
        if items.is_empty() {
            continue;
        }
        with_context(index, &mut |context| {
            let part = context
                .run(plugin, &params_json, &items)
                .map_err(|e| call_error(index, e))?;
            let part = with_checkpoint(part, &labels[index], several, plugin)?;
            frame = Some(append(frame.take(), part, plugin)?);
            let mut extra = Vec::new();
            for (name, table) in context.take_companions() {
                extra.push((
                    name,
                    with_checkpoint(table, &labels[index], several, plugin)?,
                ));
            }
            if let Some(stats) = context.weight_stats() {
                weights.push((labels[index].clone(), stats));
            }
            append_companions(&mut companions, extra, plugin)
        })?;
    }
    // A shard with no work still writes a table with the right columns.
    let frame = match frame {
        Some(frame) => frame,
        None => {
            if checkpoints.is_empty() {
                return Err(RunError::Output {
                    plugin: plugin.name.clone(),
                    problem: "no checkpoints to run on".into(),
                });
            }
            let mut empty = None;
            with_context(0, &mut |context| {
                let table = context
                    .run(plugin, &params_json, &[])
                    .map_err(|e| call_error(0, e))?;
                for (name, table) in context.take_companions() {
                    let table = with_checkpoint(table.head(Some(0)), &labels[0], several, plugin)?;
                    companions.push((name, table));
                }
                empty = Some(with_checkpoint(
                    table.head(Some(0)),
                    &labels[0],
                    several,
                    plugin,
                )?);
                Ok(())
            })?;
            empty.ok_or_else(|| RunError::Output {
                plugin: plugin.name.clone(),
                problem: "returned no table".into(),
            })?
        }
    };
    progress.finish();

    let mut metadata = vec![
        (
            "probe.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("probe.plugin".to_string(), plugin.name.clone()),
        ("probe.plugin_version".to_string(), plugin.version.clone()),
        ("probe.params".to_string(), params_json),
        (
            "probe.checkpoints".to_string(),
            serde_json::to_string(&labels).unwrap_or_default(),
        ),
    ];
    metadata.push((
        "probe.device".to_string(),
        options.engine.device.as_str().to_string(),
    ));
    metadata.push((
        "probe.threads".to_string(),
        options.engine.threads.to_string(),
    ));
    metadata.push((
        "probe.memory_budget".to_string(),
        options
            .engine
            .memory_budget
            .map_or("none".into(), |bytes| bytes.to_string()),
    ));
    if !weights.is_empty() {
        let by_label: serde_json::Map<String, serde_json::Value> = weights
            .into_iter()
            .map(|(label, stats)| (label, serde_json::to_value(stats).unwrap_or_default()))
            .collect();
        metadata.push((
            "probe.weights".to_string(),
            serde_json::Value::Object(by_label).to_string(),
        ));
    }
    if let Some(shard) = options.shard {
        metadata.push(("probe.shard".to_string(), shard.to_string()));
    }
    Ok(RunOutput {
        frame,
        companions,
        metadata,
    })
}

fn with_checkpoint(
    mut frame: DataFrame,
    label: &str,
    several: bool,
    plugin: &LoadedPlugin,
) -> Result<DataFrame, RunError> {
    if !several {
        return Ok(frame);
    }
    if frame.column("checkpoint").is_ok() {
        return Err(RunError::Output {
            plugin: plugin.name.clone(),
            problem: "returned a `checkpoint` column, which probe adds itself".into(),
        });
    }
    let column = Column::new("checkpoint".into(), vec![label; frame.height()]);
    frame
        .insert_column(0, column)
        .map_err(|e| RunError::Output {
            plugin: plugin.name.clone(),
            problem: e.to_string(),
        })?;
    Ok(frame)
}

fn append(
    acc: Option<DataFrame>,
    part: DataFrame,
    plugin: &LoadedPlugin,
) -> Result<DataFrame, RunError> {
    let Some(mut acc) = acc else { return Ok(part) };
    acc.vstack_mut(&part).map_err(|e| RunError::Output {
        plugin: plugin.name.clone(),
        problem: format!("returned tables with different columns for different checkpoints ({e})"),
    })?;
    Ok(acc)
}

/// Read a parquet file with its key-value metadata.
pub fn read_parquet(path: &Path) -> Result<(DataFrame, Vec<(String, String)>), RunError> {
    let part_error = |problem: String| RunError::Part {
        path: path.to_path_buf(),
        problem,
    };
    let file = std::fs::File::open(path).map_err(|e| part_error(e.to_string()))?;
    let mut reader = ParquetReader::new(file);
    let metadata = reader
        .get_metadata()
        .map_err(|e| part_error(format!("not a readable parquet file ({e})")))?
        .key_value_metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|kv| Some((kv.key, kv.value?)))
        .collect();
    let frame = reader
        .finish()
        .map_err(|e| part_error(format!("not a readable parquet file ({e})")))?;
    Ok((frame, metadata))
}

/// Join the part files of a sharded run: all N parts of one run, each once,
/// concatenated in shard order.
pub fn merge(parts: &[PathBuf]) -> Result<RunOutput, RunError> {
    let mut loaded = Vec::new();
    for path in parts {
        let RunOutput {
            frame,
            companions,
            metadata,
        } = RunOutput::read_parquet(path)?;
        let get = |key: &str| {
            metadata
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let shard: Shard = get("probe.shard")
            .ok_or_else(|| RunError::Part {
                path: path.clone(),
                problem: "is not a part file of `probe run --shard` (no probe.shard metadata)"
                    .into(),
            })?
            .parse()
            .map_err(|e: String| RunError::Part {
                path: path.clone(),
                problem: e,
            })?;
        let run_key = (
            get("probe.plugin"),
            get("probe.params"),
            get("probe.checkpoints"),
        );
        loaded.push((path.clone(), shard, run_key, (frame, companions), metadata));
    }
    let Some((first_path, first_shard, first_key, _, first_metadata)) = loaded.first().cloned()
    else {
        return Err(RunError::Shard("no part files given".into()));
    };
    for (path, shard, key, _, _) in &loaded {
        if shard.count != first_shard.count || *key != first_key {
            return Err(RunError::Part {
                path: path.clone(),
                problem: format!(
                    "belongs to a different run than {} (plugin, parameters, checkpoints or shard count differ)",
                    first_path.display()
                ),
            });
        }
    }
    loaded.sort_by_key(|(_, shard, ..)| shard.index);
    for (expected, (path, shard, ..)) in loaded.iter().enumerate() {
        if shard.index != expected {
            let problem = if shard.index < expected {
                format!("part {} of {} is given twice", shard.index, shard.count)
            } else {
                format!("part {expected} of {} is missing", shard.count)
            };
            return Err(RunError::Part {
                path: path.clone(),
                problem,
            });
        }
    }
    if loaded.len() != first_shard.count {
        return Err(RunError::Shard(format!(
            "part {} of {} is missing",
            loaded.len(),
            first_shard.count
        )));
    }
    let mut frames = loaded
        .into_iter()
        .map(|(path, _, _, tables, _)| (path, tables));
    let (_, (mut merged, mut companions)) = frames.next().expect("at least one part");
    for (path, (frame, extra)) in frames {
        let differ = |e: PolarsError| RunError::Part {
            path: path.clone(),
            problem: format!("columns differ from the other parts ({e})"),
        };
        merged.vstack_mut(&frame).map_err(differ)?;
        for (name, table) in extra {
            match companions.iter_mut().find(|(n, _)| *n == name) {
                Some((_, existing)) => {
                    existing.vstack_mut(&table).map_err(differ)?;
                }
                None => companions.push((name, table)),
            }
        }
    }
    let metadata = first_metadata
        .into_iter()
        .filter(|(k, _)| k != "probe.shard" && k != COMPANIONS_KEY)
        .collect();
    Ok(RunOutput {
        frame: merged,
        companions,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_work_exactly_once() {
        for total in [0, 1, 7, 272] {
            for count in [1, 2, 3, 8, 300] {
                let mut covered = Vec::new();
                for index in 0..count {
                    covered.extend(Shard { index, count }.range(total));
                }
                assert_eq!(covered, (0..total).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn shard_from_env() {
        fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
            move |k| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        }
        assert_eq!(Shard::from_env(env(&[])).unwrap(), None);
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
        ];
        assert_eq!(
            Shard::from_env(env(&slurm)).unwrap(),
            Some(Shard { index: 2, count: 4 })
        );
        let k8s = [("JOB_COMPLETION_INDEX", "1"), ("PROBE_SHARD_COUNT", "3")];
        assert_eq!(
            Shard::from_env(env(&k8s)).unwrap(),
            Some(Shard { index: 1, count: 3 })
        );
        assert!(Shard::from_env(env(&[("JOB_COMPLETION_INDEX", "1")])).is_err());
        assert!(Shard::from_env(env(&[
            ("SLURM_ARRAY_TASK_ID", "9"),
            ("SLURM_ARRAY_TASK_COUNT", "4")
        ]))
        .is_err());
    }

    #[test]
    fn shard_syntax() {
        assert_eq!("2/8".parse::<Shard>(), Ok(Shard { index: 2, count: 8 }));
        assert!("8/8".parse::<Shard>().is_err());
        assert!("1/0".parse::<Shard>().is_err());
        assert_eq!(
            Shard { index: 2, count: 8 }.part_path(Path::new("out/spectral.parquet")),
            Path::new("out/spectral.part-0002-of-0008.parquet")
        );
    }
}
