//! AdamW with decoupled weight decay, a linear-warmup + cosine learning-rate schedule, and
//! gradient clipping by global norm. Moments are plain tensors so they can be checkpointed
//! (candle_nn's AdamW keeps them private).

use std::collections::HashMap;

use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;
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

/// Moments of one variable: host vectors on the CPU (updated in one fused pass), tensors on
/// an accelerator.
enum Moments {
    Host(Vec<f32>, Vec<f32>),
    Device(Tensor, Tensor),
}

/// AdamW over a fixed, ordered list of variables.
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<(String, Var)>,
    moments: Vec<Moments>,
    t: u64,
}

/// Runs `f` on the contiguous f32 host slice of `t`.
fn with_host_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    Ok(crate::host::with_f32(t, f)?)
}

/// Per-update constants of the fused host update.
#[derive(Clone, Copy)]
struct Coeffs {
    b1: f32,
    b2: f32,
    eps: f32,
    bc1: f32,
    bc2: f32,
    lr: f32,
    keep: f32,
    scale: f32,
}

fn fused_update(c: Coeffs, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    for i in 0..w.len() {
        let gi = g[i] * c.scale;
        m[i] = c.b1 * m[i] + (1.0 - c.b1) * gi;
        v[i] = c.b2 * v[i] + (1.0 - c.b2) * gi * gi;
        let update = (m[i] / c.bc1) / ((v[i] / c.bc2).sqrt() + c.eps);
        w[i] = w[i] * c.keep - c.lr * update;
    }
}

/// The fused host update of one variable, applied in place to its storage.
struct HostUpdate<'a> {
    c: Coeffs,
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
    threads: usize,
}

impl InplaceOp2 for HostUpdate<'_> {
    fn name(&self) -> &'static str {
        "firstkd-adamw"
    }

    fn cpu_fwd(
        &self,
        ws: &mut CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(w), CpuStorage::F32(g)) = (ws, gs) else {
            candle_core::bail!("AdamW: weights and gradients must be f32");
        };
        let (Some((w0, w1)), Some((g0, g1))) = (wl.contiguous_offsets(), gl.contiguous_offsets())
        else {
            candle_core::bail!("AdamW: weights and gradients must be contiguous");
        };
        let (w, g) = (&mut w[w0..w1], &g[g0..g1]);
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        if w.len() != g.len() || w.len() != m.len() || w.len() != v.len() {
            candle_core::bail!(
                "AdamW: {} weights, {} gradients, {} / {} moments",
                w.len(),
                g.len(),
                m.len(),
                v.len()
            );
        }
        let chunk = w.len().div_ceil(self.threads).max(1 << 16);
        let c = self.c;
        // On rayon's pool: a thread spawned per tensor per step cost a stack mapping, its
        // unmapping and a TLB shoot-down on every core, each time.
        w.par_chunks_mut(chunk)
            .zip(g.par_chunks(chunk))
            .zip(m.par_chunks_mut(chunk))
            .zip(v.par_chunks_mut(chunk))
            .for_each(|(((w, g), m), v)| fused_update(c, w, g, m, v));
        Ok(())
    }
}

impl AdamW {
    /// Fresh optimizer state (zero moments) for `vars`, in the given order.
    pub fn new(vars: &[(String, Var)], params: AdamWParams) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|(_, v)| {
                let t = v.as_tensor();
                Ok(if t.device().is_cpu() {
                    Moments::Host(vec![0.0; t.elem_count()], vec![0.0; t.elem_count()])
                } else {
                    Moments::Device(t.zeros_like()?, t.zeros_like()?)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            vars: vars.to_vec(),
            moments,
            t: 0,
        })
    }

    /// Updates completed so far.
    pub fn steps_done(&self) -> u64 {
        self.t
    }

    /// One update with gradients `grads` (same order as the variables).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// One update with gradients `grads * grad_scale` (the scale implements clipping without
    /// another pass over the gradients).
    pub fn step_scaled(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::Internal(format!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )));
        }
        self.t += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.t as i32);
        let bc2 = 1.0 - p.beta2.powi(self.t as i32);
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        for ((_, var), (g, moments)) in self.vars.iter().zip(grads.iter().zip(&mut self.moments)) {
            let w = var.as_tensor();
            let decay = if w.rank() >= 2 {
                lr * p.weight_decay
            } else {
                0.0
            };
            match moments {
                Moments::Host(m, v) => {
                    let c = Coeffs {
                        b1: p.beta1 as f32,
                        b2: p.beta2 as f32,
                        eps: p.eps as f32,
                        bc1: bc1 as f32,
                        bc2: bc2 as f32,
                        lr: lr as f32,
                        keep: (1.0 - decay) as f32,
                        scale: grad_scale as f32,
                    };
                    // In place on the variable's storage: one pass over w, g, m and v.
                    let op = HostUpdate {
                        c,
                        m: RefCell::new(m),
                        v: RefCell::new(v),
                        threads,
                    };
                    w.inplace_op2(&g.contiguous()?, &op)?;
                }
                Moments::Device(m, v) => {
                    let g = (g * grad_scale)?;
                    let m_next = ((&*m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
                    let v_next = ((&*v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
                    let update = ((&m_next / bc1)? / ((&v_next / bc2)?.sqrt()? + p.eps)?)?;
                    let next = ((w * (1.0 - decay))? - (update * lr)?)?;
                    var.set(&next)?;
                    *m = m_next;
                    *v = v_next;
                }
            }
        }
        Ok(())
    }

    /// Moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for ((name, var), moments) in self.vars.iter().zip(&self.moments) {
            let shape = var.as_tensor().shape();
            let (m, v) = match moments {
                Moments::Host(m, v) => (
                    Tensor::from_slice(m, shape, &candle_core::Device::Cpu)?,
                    Tensor::from_slice(v, shape, &candle_core::Device::Cpu)?,
                ),
                Moments::Device(m, v) => (m.clone(), v.clone()),
            };
            out.insert(format!("m.{name}"), m);
            out.insert(format!("v.{name}"), v);
        }
        Ok(out)
    }

    /// Restores moments and the step count from a checkpoint.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, t: u64) -> Result<()> {
        for ((name, var), moments) in self.vars.iter().zip(&mut self.moments) {
            let mut take = |prefix: &str| -> Result<Tensor> {
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
                Ok(tensor.to_dtype(candle_core::DType::F32)?)
            };
            let (m, v) = (take("m")?, take("v")?);
            *moments = match moments {
                Moments::Host(..) => Moments::Host(
                    m.flatten_all()?.to_vec1::<f32>()?,
                    v.flatten_all()?.to_vec1::<f32>()?,
                ),
                Moments::Device(..) => {
                    let dev = var.as_tensor().device();
                    Moments::Device(m.to_device(dev)?, v.to_device(dev)?)
                }
            };
        }
        self.t = t;
        Ok(())
    }
}

/// Global L2 norm of `grads`, accumulated in f64 in order (reproducible).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += if g.device().is_cpu() && g.dtype() == candle_core::DType::F32 {
            // One read of the gradient, partial sums in f64 over fixed chunks (the same result
            // for any thread count).
            with_host_slice(g, |data| {
                data.par_chunks(1 << 14)
                    .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                    .collect::<Vec<f64>>()
                    .into_iter()
                    .sum::<f64>()
            })?
        } else {
            g.sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?
        };
    }
    Ok(total.sqrt())
}

/// The factor that brings a gradient of global norm `norm` down to `max_norm` (1 if already
/// within it).
pub fn clip_scale(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max) if norm.is_finite() && norm > max => max / (norm + 1e-6),
        _ => 1.0,
    }
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
        let s = Schedule {
            lr: 1.0,
            warmup: 4,
            total: 14,
            min_ratio: 0.1,
        };
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
            opt.step(&[Tensor::new(&g, &Device::Cpu).unwrap()], 0.1)
                .unwrap();
        }
        let got = w.as_tensor().to_vec2::<f32>().unwrap();
        let want = [0.863_540_4_f32, -2.187_68];
        for (g, e) in got[0].iter().zip(want) {
            assert!((g - e).abs() < 1e-5, "{got:?}");
        }
    }

    #[test]
    fn host_and_tensor_paths_agree() {
        // The fused host update (CPU) and the tensor update (accelerators) on the same data.
        let init = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let grads: Vec<Tensor> = (0..3)
            .map(|i| ((init.clone() * 0.1).unwrap().cos().unwrap() + i as f64).unwrap())
            .collect();
        let run = |tensor_path: bool| -> (Vec<f32>, Vec<f32>) {
            let w = Var::from_tensor(&init).unwrap();
            let mut opt = AdamW::new(&[("w".into(), w.clone())], AdamWParams::default()).unwrap();
            if tensor_path {
                opt.moments = vec![Moments::Device(
                    init.zeros_like().unwrap(),
                    init.zeros_like().unwrap(),
                )];
            }
            for g in &grads {
                opt.step_scaled(std::slice::from_ref(g), 0.05, 0.7).unwrap();
            }
            let state = opt.state_tensors().unwrap();
            (
                w.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
                state["v.w"].flatten_all().unwrap().to_vec1().unwrap(),
            )
        };
        let (a, b) = (run(false), run(true));
        for (x, y) in a.0.iter().zip(&b.0).chain(a.1.iter().zip(&b.1)) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn global_norm_over_many_chunks_matches_a_direct_sum() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let a: Vec<f32> = (0..100_000).map(|_| rng.random::<f32>() - 0.5).collect();
        let b: Vec<f32> = (0..77).map(|_| rng.random::<f32>() * 4.0).collect();
        let expected = a
            .iter()
            .chain(&b)
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        let dev = &candle_core::Device::Cpu;
        let ts = [
            Tensor::from_vec(a, (1000, 100), dev).unwrap().t().unwrap(),
            Tensor::from_vec(b, 77, dev).unwrap(),
        ];
        let got = global_norm(&ts).unwrap();
        assert!(
            (got - expected).abs() < 1e-9 * expected,
            "{got} vs {expected}"
        );
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap()];
        let before = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-9);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
    }
}
