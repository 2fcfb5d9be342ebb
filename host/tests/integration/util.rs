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

/// The shared library of a workspace plugin crate, built (once per test
/// process) with the same profile as the tests. `cargo test` builds no
/// cdylibs by itself, so the tests ask cargo for them.
pub fn plugin_lib(crate_name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet"]);
        for name in PLUGIN_CRATES {
            cargo.args(["--package", name]);
        }
        let output = cargo.output().map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    });
    if let Err(message) = built {
        panic!("building the plugins failed:\n{message}");
    }
    let dir = Path::new(env!("CARGO_BIN_EXE_probe")).parent().unwrap();
    let path = dir.join(format!("lib{}.so", crate_name.replace('-', "_")));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// Every cdylib crate the tests load.
pub const PLUGIN_CRATES: [&str; 4] = [
    "probe-plugin-spectral",
    "probe-testkit",
    "probe-testkit-wrong-abi",
    "probe-testkit-not-a-plugin",
];

/// Read a parquet file into a frame.
pub fn read_parquet(path: &Path) -> polars::prelude::DataFrame {
    use polars::prelude::*;
    ParquetReader::new(std::fs::File::open(path).unwrap())
        .finish()
        .unwrap()
}
