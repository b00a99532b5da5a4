//! AdamW with decoupled weight decay, a linear-warmup + cosine learning-rate schedule, and
//! gradient clipping by global norm. Moments are plain tensors so they can be checkpointed
//! (candle_nn's AdamW keeps them private).

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Optimizer hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norms or biases).
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Learning rate at a step: linear warmup from `lr / warmup` to `lr` over `warmup` steps,
/// then cosine decay to `lr * min_ratio` at `total` steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// Total steps.
    pub total: u64,
    /// Final learning rate as a fraction of `lr`.
    pub min_ratio: f64,
}

impl Schedule {
    /// Learning rate of 0-based step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let min = self.lr * self.min_ratio;
        min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// AdamW over a fixed, ordered list of variables.
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: u64,
}

impl AdamW {
    /// Fresh optimizer state (zero moments) for `vars`, in the given order.
    pub fn new(vars: &[(String, Var)], params: AdamWParams) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.iter().map(|t| t.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            vars: vars.to_vec(),
            m,
            v,
            t: 0,
        })
    }

    /// Updates completed so far.
    pub fn steps_done(&self) -> u64 {
        self.t
    }

    /// One update with gradients `grads` (same order as the variables).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::InvalidArgument(format!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )));
        }
        self.t += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.t as i32);
        let bc2 = 1.0 - p.beta2.powi(self.t as i32);
        for (i, ((_, var), g)) in self.vars.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + p.eps)?)?;
            let w = var.as_tensor();
            let decay = if w.rank() >= 2 { lr * p.weight_decay } else { 0.0 };
            let next = ((w * (1.0 - decay))? - (update * lr)?)?;
            var.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores moments and the step count from a checkpoint.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, t: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let tensor = tensors.remove(&key).ok_or_else(|| {
                    Error::InvalidArgument(format!("optimizer state has no {key}"))
                })?;
                if tensor.dims() != var.as_tensor().dims() {
                    return Err(Error::InvalidArgument(format!(
                        "optimizer state {key} has shape {:?}, weight has {:?}",
                        tensor.dims(),
                        var.as_tensor().dims()
                    )));
                }
                *slot = tensor.to_device(var.as_tensor().device())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Global L2 norm of `grads`, accumulated in f64 in order (reproducible).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if norm.is_finite() && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_shape() {
        let s = Schedule { lr: 1.0, warmup: 4, total: 14, min_ratio: 0.1 };
        assert!((s.lr_at(0) - 0.25).abs() < 1e-12);
        assert!((s.lr_at(3) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(4) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(9) - 0.55).abs() < 1e-12);
        assert!((s.lr_at(14) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(100) - 0.1).abs() < 1e-12);
    }

    /* numpy reference for two AdamW steps on w = [1, -2] (matrix, decay applies), lr 0.1:
    import numpy as np
    w = np.array([[1.0, -2.0]]); m = v = 0 * w; b1, b2, eps, wd, lr = 0.9, 0.999, 1e-8, 0.01, 0.1
    for t, g in [(1, np.array([[0.5, 0.1]])), (2, np.array([[-0.2, 0.3]]))]:
        m = b1 * m + (1 - b1) * g; v = b2 * v + (1 - b2) * g * g
        w = w * (1 - lr * wd) - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    print(w.tolist())   # [[0.8635404181145108, -2.1876800978044098]]
    */
    #[test]
    fn adamw_matches_numpy() {
        let w = Var::from_tensor(&Tensor::new(&[[1f32, -2.0]], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(&[("w".into(), w.clone())], AdamWParams::default()).unwrap();
        for g in [[[0.5f32, 0.1]], [[-0.2, 0.3]]] {
            opt.step(&[Tensor::new(&g, &Device::Cpu).unwrap()], 0.1).unwrap();
        }
        let got = w.as_tensor().to_vec2::<f32>().unwrap();
        let want = [0.8635404181145108f32, -2.1876800978044098];
        for (g, e) in got[0].iter().zip(want) {
            assert!((g - e).abs() < 1e-5, "{got:?}");
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap()];
        let before = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-9);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
    }
}
