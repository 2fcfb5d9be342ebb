use polars::prelude::DataFrame;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The result of one `probe` invocation.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Assert success and return stdout.
    #[track_caller]
    pub fn ok(self) -> String {
        assert_eq!(
            self.code,
            Some(0),
            "probe failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self.stdout
    }

    /// Assert the documented failure: exit code 2, one line on stderr
    /// containing every fragment, and no panic.
    #[track_caller]
    pub fn fails_with(self, fragments: &[&str]) {
        assert_eq!(
            self.code,
            Some(2),
            "expected exit code 2, stderr:\n{}",
            self.stderr
        );
        assert!(
            !self.stderr.contains("thread '"), // a Rust panic prints "thread '…' panicked at"
            "probe panicked:\n{}",
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one error line, got:\n{}",
            self.stderr
        );
        for fragment in fragments {
            assert!(
                self.stderr.contains(fragment),
                "stderr lacks {fragment:?}:\n{}",
                self.stderr
            );
        }
    }
}

pub fn probe<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let output: Output = Command::new(env!("CARGO_BIN_EXE_probe"))
        .args(args)
        .output()
        .expect("the probe binary runs");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `probe run --plugin PLUGIN MODEL --param P… EXTRA…`.
pub fn run_plugin(plugin: &str, model: &Path, params: &[&str], extra: &[&str]) -> Run {
    let mut args = vec![
        "run".to_string(),
        "--plugin".into(),
        plugin.into(),
        model.display().to_string(),
    ];
    for param in params {
        args.extend(["--param".to_string(), param.to_string()]);
    }
    args.extend(extra.iter().map(|e| e.to_string()));
    probe(&args)
}

/// Run a built-in plugin (by crate name) quietly into `out`; return `out`.
pub fn run_plugin_to(crate_name: &str, model: &Path, params: &[&str], out: &Path) -> PathBuf {
    let lib = plugin_lib(crate_name).display().to_string();
    run_plugin(
        &lib,
        model,
        params,
        &["--out", out.to_str().unwrap(), "--quiet"],
    )
    .ok();
    out.to_path_buf()
}

/// The committed fixture of that name.
pub fn fixture(name: &str) -> PathBuf {
    let path = probe_fixtures::data_dir().join(name);
    assert!(
        path.exists(),
        "missing fixture {name}: run `cargo xtask fixtures`"
    );
    path
}

pub fn inspect_json(path: &Path) -> serde_json::Value {
    let out = probe([
        "inspect".as_ref(),
        "--format".as_ref(),
        "json".as_ref(),
        path.as_os_str(),
    ])
    .ok();
    serde_json::from_str(&out).expect("inspect prints JSON")
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary folder")
}

/// Copy a fixture folder to `dest`.
pub fn copy_dir(from: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dest.join(entry.file_name())).unwrap();
    }
}

/// The shared library of a workspace plugin crate, as `cargo build
/// --workspace` (the first half of the README's test command) left it.
///
/// `cargo test` builds no cdylibs, and a nested `cargo build` from inside the
/// tests would relink the `probe` binary other tests are running, so the
/// tests only check that the library exists and is newer than its sources
/// and the SDK's — a stale plugin would test old code.
pub fn plugin_lib(crate_name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_probe")).parent().unwrap();
    let path = dir.join(format!("lib{}.so", crate_name.replace('-', "_")));
    let fix = "run `cargo build --workspace` before `cargo test --workspace`";
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {fix}", path.display()));
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let folder = crate_name
        .strip_prefix("probe-plugin-")
        .unwrap_or(crate_name.strip_prefix("probe-").unwrap_or(crate_name));
    let crate_dir = plugins.join(folder);
    let uses_sdk = std::fs::read_to_string(crate_dir.join("Cargo.toml"))
        .is_ok_and(|m| m.contains("probe-sdk"));
    let mut sources = vec![crate_dir.join("src")];
    if uses_sdk {
        sources.push(plugins.join("sdk/src"));
    }
    for source in sources {
        if let Some(newest) = newest_file(&source) {
            assert!(
                newest <= built,
                "{} is older than its sources: {fix}",
                path.display()
            );
        }
    }
    path
}

fn newest_file(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let time = if path.is_dir() {
            newest_file(&path)
        } else {
            entry.metadata().ok().and_then(|m| m.modified().ok())
        };
        newest = newest.max(time);
    }
    newest
}

/// Read a parquet file into a frame.
pub fn read_parquet(path: &Path) -> DataFrame {
    use polars::prelude::*;
    ParquetReader::new(std::fs::File::open(path).unwrap())
        .finish()
        .unwrap()
}

/// Run `probe ARGS` to completion; its exit code and its own peak resident
/// set in kB (anonymous and mapped file pages together), from wait4.
pub fn probe_peak_rss<I, S>(args: I) -> (Option<i32>, i64)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let child = Command::new(env!("CARGO_BIN_EXE_probe"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the probe binary runs");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain integers, for which all zeroes is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child; status and usage are valid places to write.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    // Reaped by wait4: the Child must not wait again.
    std::mem::forget(child);
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (code, usage.ru_maxrss)
}

/// A string column without nulls.
pub fn column_str(frame: &DataFrame, name: &str) -> Vec<String> {
    frame
        .column(name)
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|s| s.unwrap().to_string())
        .collect()
}

/// A float column without nulls.
pub fn column_f64(frame: &DataFrame, name: &str) -> Vec<f64> {
    frame
        .column(name)
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect()
}

/// A float column with its nulls.
pub fn column_opt_f64(frame: &DataFrame, name: &str) -> Vec<Option<f64>> {
    frame.column(name).unwrap().f64().unwrap().iter().collect()
}

/// An integer column with its nulls (any integer type).
pub fn column_opt_i64(frame: &DataFrame, name: &str) -> Vec<Option<i64>> {
    frame
        .column(name)
        .unwrap()
        .cast(&polars::prelude::DataType::Int64)
        .unwrap()
        .i64()
        .unwrap()
        .iter()
        .collect()
}

/// An integer column without nulls.
pub fn column_i64(frame: &DataFrame, name: &str) -> Vec<i64> {
    frame
        .column(name)
        .unwrap()
        .i64()
        .unwrap()
        .into_no_null_iter()
        .collect()
}

/// A llama fixture with a word-level tokenizer over the words below (ids
/// 1, 5, 9, … so that a wrong offset cannot pass).
pub fn fixture_with_tokenizer(dir: &Path) -> PathBuf {
    family_with_tokenizer(dir, "llama-tied-f32")
}

/// The decoder fixtures the forward-pass plugins are checked on, so that
/// nothing is right on llama alone: untied heads, biases, q/k norms, Gemma's
/// sandwich norms and sliding window, GPT-2's learned positions.
pub const DECODER_FIXTURES: [&str; 5] = [
    "llama-tied-f32",
    "qwen2-untied-f16",
    "qwen3-tied-bf16",
    "gemma3-tied-f32",
    "gpt2-tied-f32",
];

/// The fixture `name` with the word-level tokenizer of
/// [`fixture_with_tokenizer`].
pub fn family_with_tokenizer(dir: &Path, name: &str) -> PathBuf {
    let model = dir.join(name);
    copy_dir(&fixture(name), &model);
    let words = [
        "<unk>", "the", "cat", "sat", "on", "mat", "it", "was", "big", "large", "huge", "and",
        "warm", "day", "very", "hot", "cold", "dry", "is", "yes", "no", "sir", ".",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), (i as u64 * 4 + 1).into()))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    model
}

/// Two prompts with given completions (a fact and a line of code), written
/// into `dir` as a prompt set: the real-model tests' few prompts.
pub fn two_real_prompts(dir: &Path) -> PathBuf {
    let set = dir.join("two.jsonl");
    std::fs::write(
        &set,
        "{\"category\": \"factual\", \"prompt\": \"The capital of France is\", \"completion\": \" Paris, a city on the Seine.\"}\n\
         {\"category\": \"code\", \"prompt\": \"def add(a, b):\\n    return\", \"completion\": \" a + b\"}\n",
    )
    .unwrap();
    set
}
