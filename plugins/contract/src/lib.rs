//! probe-contract: the one definition of everything that crosses the
//! boundary between probe (the host) and its plugins.
//!
//! Both sides depend on this crate and on nothing of each other, so a change
//! to the boundary is a compile error on the side that has not caught up —
//! never a run-time surprise. It holds:
//!
//! - [`abi`]: the `#[repr(C)]` function tables, their `(major, minor)`
//!   version and the status codes;
//! - [`model`]: [`Role`], [`Family`] and [`Dtype`] as enums with their
//!   predicates (they cross as the strings users see in tables), the model
//!   facts and the tensor descriptions a plugin reads;
//! - [`forward`]: the forward request and the description of its result,
//!   and greedy generation's request and reply;
//! - [`lens`]: the reduced logit lens (entropy, top-k, target rank, KL
//!   between rows), computed in the host;
//! - [`messages`]: the other JSON messages (`write_reordered`, run facts,
//!   text encoding);
//! - [`params`]: parameter specs, the user's `--param` text parsed into typed
//!   values, and the check of a selection against a model;
//! - [`guard`]: the one helper that turns a panic into an error message.
//!
//! It depends on serde alone: no polars, no ONNX Runtime. The Arrow C Data
//! Interface structs appear in the tables as opaque types; each side reads
//! them with its own Arrow implementation.

#![warn(missing_docs)]

pub mod abi;
pub mod forward;
pub mod guard;
pub mod lens;
pub mod messages;
pub mod model;
pub mod params;

pub use abi::AbiVersion;
pub use forward::{
    Branches, Edit, EditChange, ForwardMeta, ForwardRequest, GenerateReply, GenerateRequest, Hook,
    OutputKind, Sublayer,
};
pub use lens::{LensReply, LensRequest, LensRow};
pub use messages::{EncodeRequest, RunInfo, TextMode, WriteReordered};
pub use model::{Dtype, Family, ModelInfo, Quant, Role, TensorInfo};
pub use params::{ParamError, ParamKind, ParamSpec, Params};
