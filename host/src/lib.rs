//! probe's library: the checkpoint store, the model schema and the table
//! writers that the `probe` binary and its plugins' host are built from.
//!
//! See ARCHITECTURE.md for how data flows from a file to a table.

pub mod error;
pub mod forward;
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
pub mod host_api;
pub mod inspect;
pub mod limits;
pub mod plugin;
pub mod progress;
pub mod run;
pub mod schema;
pub mod shuffle;
pub mod source;
pub mod store;
pub mod table;

pub use error::StoreError;
pub use schema::{Family, Placement, Role, Schema};
pub use store::{Checkpoint, Dtype, TensorEntry, TensorView};
