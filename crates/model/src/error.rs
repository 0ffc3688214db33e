//! The crate's one error type: everything that can go wrong loading a model and its sidecar,
//! checking them against the model contract, or running inference.

use std::path::PathBuf;

/// Why a model could not be loaded or run.
///
/// Load-time variants carry enough context to fix the model file; the run-time shape variants
/// ([`ModelError::SequenceShape`]) are small and allocation-free because they come from the
/// hot path and indicate a caller bug rather than a bad model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model or sidecar file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The sidecar is not valid JSON or does not have the sidecar's structure.
    #[error("invalid model sidecar JSON: {0}")]
    SidecarJson(#[from] serde_json::Error),
    /// The sidecar lists no feature columns.
    #[error("model sidecar lists no feature_cols")]
    NoFeatures,
    /// A feature column is listed twice.
    #[error("model sidecar lists feature {0:?} twice")]
    DuplicateFeature(String),
    /// A feature column has no scaler mean.
    #[error("model sidecar has no scaler mean for feature {0:?}")]
    MissingMean(String),
    /// A feature column has no scaler std.
    #[error("model sidecar has no scaler std for feature {0:?}")]
    MissingStd(String),
    /// A feature's scaler mean is NaN or infinite.
    #[error("model sidecar scaler mean for feature {feature:?} is {mean}, must be finite")]
    BadMean {
        /// The feature column.
        feature: String,
        /// The offending value.
        mean: f32,
    },
    /// A feature's scaler std is not a finite number greater than zero.
    #[error("model sidecar scaler std for feature {feature:?} is {std}, must be finite and > 0")]
    BadStd {
        /// The feature column.
        feature: String,
        /// The offending value.
        std: f32,
    },
    /// `state` has a zero dimension or a direction count other than 1 or 2.
    #[error(
        "model sidecar state {{layers: {layers}, directions: {directions}, hidden: {hidden}}} is invalid: \
         layers and hidden must be > 0, directions 1 or 2"
    )]
    BadStateSpec {
        /// Recurrent layers.
        layers: usize,
        /// Directions per layer.
        directions: usize,
        /// Hidden units per layer and direction.
        hidden: usize,
    },
    /// `movement_threshold` is outside [0, 1].
    #[error("model sidecar movement_threshold {0} must lie in [0, 1]")]
    BadThreshold(f32),
    /// `version` is empty, longer than `sidecar::MAX_VERSION_LEN` or not printable ASCII.
    #[error(
        "model sidecar version {0:?} must be 1 to 64 printable ASCII characters without spaces"
    )]
    BadVersion(String),
    /// tract could not parse, type or optimise the ONNX graph.
    #[error("ONNX model: {0}")]
    Onnx(String),
    /// The ONNX graph lacks an input the contract requires (`sequence_features`, or `c_0` beside `h_0`).
    #[error("ONNX model has no input {0:?}")]
    MissingInput(&'static str),
    /// The ONNX graph lacks an output the contract requires.
    #[error("ONNX model has no output {0:?}")]
    MissingOutput(&'static str),
    /// The ONNX graph has an input the contract does not define.
    #[error(
        "ONNX model has unexpected input {0:?} (the contract defines sequence_features, h_0, c_0)"
    )]
    UnexpectedInput(String),
    /// An ONNX input or output has a type or shape the contract does not allow.
    #[error("ONNX {tensor} must be {expected}, model declares {found}")]
    TensorShape {
        /// Input or output name.
        tensor: &'static str,
        /// What the contract requires, e.g. `f32 [batch, T, 2]`.
        expected: String,
        /// What the model declares or produced.
        found: String,
    },
    /// The model takes `h_0` but the sidecar has no `state`, or the other way round.
    #[error("ONNX model {model} but its sidecar {sidecar}")]
    StateMismatch {
        /// What the model does, e.g. "takes h_0".
        model: &'static str,
        /// What the sidecar says, e.g. "has no state".
        sidecar: &'static str,
    },
    /// A sequence handed to [`crate::Model::run`] has a buffer of the wrong length.
    #[error("sequence {index}: {buffer} has {found} values, expected {expected}")]
    SequenceShape {
        /// Position of the sequence in the slice passed to `run`.
        index: usize,
        /// Which buffer: `features`, `h`, `c`, `velocity` or `movement_prob`.
        buffer: &'static str,
        /// Required length.
        expected: usize,
        /// Actual length.
        found: usize,
    },
    /// The engine failed while running a model call (tract plan or ONNX Runtime session).
    #[error("inference failed: {0}")]
    Inference(String),
    /// The model was asked to run on an engine this build does not contain (its Cargo feature,
    /// e.g. `onnxruntime`, is off).
    #[error("the {0} engine is not compiled in (build sensorflow-model with the feature {0:?})")]
    EngineNotBuilt(&'static str),
    /// The ONNX Runtime shared library could not be loaded: missing file, not a shared library,
    /// or an ONNX Runtime older than the API version `ort` needs.
    #[error("cannot load the ONNX Runtime library {path}: {reason}")]
    RuntimeLibrary {
        /// The library path given in [`Engine::OnnxRuntime`](crate::Engine::OnnxRuntime).
        path: PathBuf,
        /// What the loader reported.
        reason: String,
    },
    /// An ONNX Runtime library is already loaded from another path; a process can hold only one.
    #[error(
        "ONNX Runtime is already loaded from {loaded}; cannot also load {requested} \
         (one ONNX Runtime library per process)"
    )]
    RuntimeLibraryConflict {
        /// The library loaded first, which stays in use.
        loaded: PathBuf,
        /// The library asked for now.
        requested: PathBuf,
    },
    /// The native engine does not recognise the graph: it runs only the contract's stacked
    /// forward LSTM with a linear head (see [`Engine::Native`](crate::Engine::Native)); the
    /// message names the node or attribute that did not match.
    #[error("the native engine does not support this graph: {0}")]
    UnsupportedGraph(String),
    /// The native engine recognised the graph but its results differ from tract's on the
    /// load-time probe (random inputs and state) by more than the tolerance (1e-4): the graph
    /// means something the native engine does not compute, so it is refused.
    #[error("the native engine differs from tract on {output} by {max_diff} (tolerance 1e-4)")]
    NativeMismatch {
        /// The output or final state with the largest difference.
        output: &'static str,
        /// The largest absolute difference found (infinite for a NaN on one side).
        max_diff: f32,
    },
    /// ONNX Runtime could not create its environment or a session for the graph (invalid
    /// options, or the graph rejected by ONNX Runtime).
    #[error("ONNX Runtime session: {0}")]
    RuntimeSession(String),
}

impl ModelError {
    /// Wraps a tract error, keeping its whole context chain in the message.
    pub(crate) fn onnx(e: impl std::fmt::Display) -> ModelError {
        ModelError::Onnx(format!("{e:#}"))
    }

    pub(crate) fn inference(e: impl std::fmt::Display) -> ModelError {
        ModelError::Inference(format!("{e:#}"))
    }
}
