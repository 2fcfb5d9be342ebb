//! probe's one integration-test binary (as ripgrep does it): every test runs
//! the real `probe` executable on real files.

mod autopsy;
mod big;
mod boundary;
mod budget;
mod contrastive;
mod forward;
mod fuzz_corpus;
mod geometry;
mod gguf;
mod inspect;
mod knockout;
mod lens;
mod linearity;
mod patch;
mod plugins;
mod quant;
mod real_models;
mod report;
mod scaffold;
mod shuffle;
mod spectral;
mod swap;
mod util;
mod vshape;
