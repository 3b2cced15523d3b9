//! Placeholder: AI model detection, implemented by the GPU providers work.

/// A detected model: `provider` is the part of `model` before the first `/`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModelInfo {
    pub provider: String,
    pub model: String,
}

/// Detects the model served by `pid` from its command line and a few parents.
pub fn detect_for_pid(pid: u32) -> Option<ModelInfo> {
    let _ = pid;
    None
}
