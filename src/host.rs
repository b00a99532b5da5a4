//! Borrowing a tensor's f32 values on the host, for the code that works on plain slices (the
//! fused kernels, the optimizer's host update, top-k selection, cloze scoring).

use candle_core::{DType, Device, Storage, Tensor};

/// Runs `f` on the f32 values of `t` in row-major order. A tensor on an accelerator is copied
/// to the host first and a strided one made contiguous; other dtypes are refused.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    if t.dtype() != DType::F32 {
        candle_core::bail!("expected an f32 tensor, got {:?}", t.dtype());
    }
    let t = if t.device().is_cpu() {
        t.contiguous()?
    } else {
        t.to_device(&Device::Cpu)?.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("tensor was not copied to the host");
    };
    let data = cpu.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(f(&data[start..end])),
        None => candle_core::bail!("tensor is not contiguous after contiguous()"),
    }
}
