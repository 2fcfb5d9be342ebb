//! Errors of the library crate. Every message starts with the file it is
//! about, so the CLI can print it as one line.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: no such file or folder", path.display())]
    NotFound { path: PathBuf },

    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    /// A safetensors file whose header or size is wrong.
    #[error("{}: {problem}", file.display())]
    Malformed { file: PathBuf, problem: String },

    /// A shard index that cannot be read or disagrees with its shards.
    #[error("{}: {problem}", file.display())]
    Index { file: PathBuf, problem: String },

    /// A `config.json` that cannot be read.
    #[error("{}: {problem}", file.display())]
    Config { file: PathBuf, problem: String },

    /// A file or folder of a kind probe does not read.
    #[error("{}: {problem}", path.display())]
    Unsupported { path: PathBuf, problem: String },

    /// One of the limits that protect the user's memory was exceeded.
    #[error("{}: {problem}", file.display())]
    Limit { file: PathBuf, problem: String },

    #[error("{}: tensor `{tensor}` is stored twice (also in {})", file.display(), other.display())]
    DuplicateTensor {
        file: PathBuf,
        tensor: String,
        other: PathBuf,
    },

    #[error("{}: no tensor named `{tensor}`", path.display())]
    MissingTensor { path: PathBuf, tensor: String },

    #[error("{}: tensor `{tensor}` has dtype {dtype}, which is not a floating-point type", file.display())]
    NotFloat {
        file: PathBuf,
        tensor: String,
        dtype: &'static str,
    },

    #[error(
        "{}: no checkpoint here (expected a .safetensors or .gguf file, a *.safetensors.index.json shard index, or folders holding checkpoints)",
        path.display()
    )]
    NoCheckpoint { path: PathBuf },

    #[error("{}: this folder holds several checkpoints of a run; open it with `source::open_all`", path.display())]
    IsRun { path: PathBuf },
}

impl StoreError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Self::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            Self::Io {
                path: path.to_path_buf(),
                cause: source,
            }
        }
    }
}
