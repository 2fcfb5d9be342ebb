//! Forward passes through ONNX Runtime, block by block.
//!
//! The graphs are generated from the checkpoint (see [`arch`] and [`graph`]);
//! [`engine::Engine`] runs them with the weights borrowed from the mapping and
//! hands back the residual stream between blocks. [`text`] turns text into
//! token ids with the checkpoint's own `tokenizer.json`.

pub mod arch;
pub mod engine;
pub mod graph;
pub mod runtime;
pub mod summary;
pub mod text;

use std::path::PathBuf;

use thiserror::Error;

pub use engine::{Capture, Device, EditKind, Engine, EngineOptions, Request, ResidualEdit, Trace};

use crate::error::StoreError;

#[derive(Debug, Error)]
pub enum ForwardError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Runtime(String),
    #[error("{file}: {what} is not supported")]
    Unsupported { file: PathBuf, what: String },
    #[error("{file}: {problem}")]
    Config { file: PathBuf, problem: String },
    #[error("{file}: missing {what}")]
    MissingTensor { file: PathBuf, what: String },
    #[error("{file}: tensor `{tensor}` has shape {got:?}, the architecture needs {want:?}")]
    Shape {
        file: PathBuf,
        tensor: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("{file}: ONNX Runtime failed {what}: {message}")]
    Onnx {
        file: PathBuf,
        what: String,
        message: String,
    },
    #[error("the {device} execution provider cannot be used: {message} (it needs the GPU build of ONNX Runtime: see the README's GPU recipe)")]
    Device {
        device: &'static str,
        message: String,
    },
    #[error("{file}: {problem}")]
    Request { file: PathBuf, problem: String },
    #[error("{file}: {problem}")]
    Tokenizer { file: PathBuf, problem: String },
}
