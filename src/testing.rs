//! Comparison helpers shared by the unit tests, the integration tests and the GPU checks.
//! Not part of the stable API.

use candle_core::{Device, Tensor};

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
