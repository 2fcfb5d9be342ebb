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
            !self.stderr.contains("panicked"),
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
