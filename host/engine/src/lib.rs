//! Forward passes through ONNX Runtime, block by block.
//!
//! The graphs are generated from the checkpoint's architecture
//! ([`probe_store::arch`]) by [`graph`]; [`engine::Engine`] runs them with
//! the weights borrowed from the mapping and hands back the residual stream
//! between blocks; [`lens`] reduces the logit lens where the logits are
//! made. [`runtime`] finds and loads the ONNX Runtime library.

#![forbid(unsafe_code)]

pub mod engine;
mod generate;
pub mod graph;
pub mod lens;
pub mod runtime;
mod suffix;
pub mod weights;

pub use probe_store::arch;

use std::path::PathBuf;

use thiserror::Error;

pub use engine::{
    Capture, Device, Edit, EditChange, Engine, EngineOptions, Hook, Request, Sublayer, Trace,
    WeightOverride,
};
pub use weights::WeightStats;

use probe_store::arch::ArchError;
use probe_store::StoreError;
use probe_text::TextError;

#[derive(Debug, Error)]
pub enum ForwardError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Runtime(String),
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error(transparent)]
    Text(#[from] TextError),
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
    #[error(
        "{file}: {what} needs {} of f32 weights at once, more than the memory budget of {} (--memory-budget)",
        bytesize::ByteSize(*needed as u64),
        bytesize::ByteSize(*budget as u64)
    )]
    Budget {
        file: PathBuf,
        what: String,
        needed: usize,
        budget: usize,
    },
}
