//! Which inference engine executes a model's graph: tract (pure Rust, always built), the
//! native fused LSTM kernel (pure Rust, always built, for the contract's LSTM graphs only), or
//! ONNX Runtime loaded from a shared library at run time (Cargo feature `onnxruntime`).

use std::path::PathBuf;

/// The engine behind a [`Model`](crate::Model), chosen at load time.
///
/// All engines give the same results (within float rounding of their kernels, <= 1e-4 in the
/// tests), the same batching of sequences into calls and the same errors for malformed
/// sequences; they differ in speed and in what they need at run time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Engine {
    /// tract, pure Rust, compiled into every build. Compiles one plan per `(batch, T)` shape.
    #[default]
    Tract,
    /// A hand-written fused kernel for the contract's model shape: a stack of forward ONNX
    /// `LSTM` layers (default activations, no peepholes or clipping) on `sequence_features`,
    /// stateful through slices of `h_0`/`c_0` or stateless, and a linear head whose column
    /// gives `velocity_pred` and whose sigmoid of another column gives `movement_prob` (the
    /// graph `scripts/train_demo_model.py` exports). On the demo model about 1.5x as fast as
    /// ONNX Runtime with one thread and 4-6x tract, with no library to load; each sequence's
    /// result is bit-identical whatever batch it runs in.
    ///
    /// Any other graph is refused at load with
    /// [`ModelError::UnsupportedGraph`](crate::ModelError::UnsupportedGraph); a graph it
    /// recognises is also run on tract at load on random inputs and refused with
    /// [`ModelError::NativeMismatch`](crate::ModelError::NativeMismatch) if the results differ.
    Native,
    /// ONNX Runtime, loaded with `dlopen` from `library` (e.g. the `libonnxruntime.so.1.x` of
    /// the `onnxruntime` PyPI wheel). Needs ONNX Runtime 1.17 or newer and the crate feature
    /// `onnxruntime`; without the feature, loading a model with this engine fails with
    /// [`ModelError::EngineNotBuilt`](crate::ModelError::EngineNotBuilt).
    ///
    /// A process holds at most one ONNX Runtime library: every model using this engine must
    /// name the same `library` (the first one loaded stays loaded until the process exits).
    OnnxRuntime {
        /// Path of the ONNX Runtime shared library.
        library: PathBuf,
        /// Threads ONNX Runtime may use inside one model call (its intra-op pool); 1 runs
        /// calls on the caller's thread only; 0 lets ONNX Runtime pick (one per core).
        intra_threads: usize,
    },
}

impl Engine {
    /// Short engine name for logs and metrics: `"tract"`, `"native"` or `"onnxruntime"`.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Tract => "tract",
            Engine::Native => "native",
            Engine::OnnxRuntime { .. } => "onnxruntime",
        }
    }
}
