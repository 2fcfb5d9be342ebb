//! probe's library: the plugin host, the table writers and the commands the
//! `probe` binary is built from, over the store ([`probe_store`]), the
//! tokenizer ([`probe_text`]) and the forward engine ([`probe_engine`]).
//!
//! See ARCHITECTURE.md for how data flows from a file to a table.

pub mod codec;
pub mod convert;
pub mod host_api;
pub mod inspect;
pub mod memory;
pub mod plugin;
pub mod progress;
pub mod run;
pub mod shuffle;
pub mod summary;
pub mod table;

pub use probe_contract::guard;
pub use probe_store::{arch, error, limits, schema, source, store};
pub use probe_store::{Checkpoint, Dtype, Family, Placement, Role, Schema, StoreError};
pub use probe_store::{TensorEntry, TensorView};

/// The forward engine and the tokenizer, as one path for callers.
pub mod forward {
    pub use crate::summary;
    pub use probe_engine::*;
    pub use probe_text as text;
}

/// Entry points of the fuzz targets, replayed over their corpus by the tests.
#[doc(hidden)]
pub mod fuzzing {
    pub use probe_contract::params::fuzz_plugin_params as plugin_params;
    pub use probe_store::fuzzing::{config_json, gguf_file, safetensors_file, shard_index};
    pub use probe_text::fuzz_tokenizer_json as tokenizer_json;
}
