//! The hlac runtime: loads the artifacts `hlac build` writes and checks them before anything runs.
//! Later issues add the CPU and GPU executors here.
//!
//! **Architecture invariant:** this crate never depends on the compiler or on LLVM; an application
//! that links it gets only what it needs to run a compiled model.

pub mod cpu;
pub mod gpu;
pub mod kir;
mod manifest;

pub use manifest::{
    Artifact, ArtifactError, KernelInfo, LayerInfo, Manifest, MixerInfo, ModelInfo, PieceInfo, PieceUse, TargetInfo, TensorInfo,
    FORMAT_VERSION, MANIFEST_FILE,
};
