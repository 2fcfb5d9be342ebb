//! probe's checkpoint store: what a path holds ([`source`]), the tensors of
//! one checkpoint memory-mapped with only their headers parsed ([`store`];
//! safetensors, or GGUF through [`gguf`], [`gguf_model`] and [`quants`]),
//! where each tensor sits in the model ([`schema`]) and what the model
//! computes ([`arch`]). Every reader takes bytes as well as paths, so the
//! fuzzers run in memory. No polars, no ONNX Runtime, no tokenizer: this
//! crate is the part of probe that reads untrusted files.

pub mod arch;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod gguf;
pub mod gguf_model;
pub mod limits;
pub mod quants;
pub mod schema;
pub mod source;
pub mod store;

pub use error::StoreError;
pub use probe_contract::{Dtype, Family, Role};
pub use schema::{Placement, Schema};
pub use store::{Checkpoint, TensorEntry, TensorView};
