//! f32 matrix products with AVX-512 for the CPU teacher's projections (`y = x W^T`).
//!
//! candle's CPU `matmul` goes through the `gemm` crate, whose AVX-512 kernels need a nightly
//! compiler; on stable it runs 8-lane AVX2 kernels (`gemm_f32::microkernel::fma::f32::x2x6`
//! was 74% of a `firstkd label` profile on an AVX-512 Xeon). This kernel uses all 16 lanes:
//! the weights are packed once into panels of [`NR`] output columns (`[panel][k][32]`), a
//! micro-tile of [`MR`] activation rows x 32 columns keeps 24 accumulators in registers, and
//! the reduction axis is cut into chunks of [`KC`] so that a chunk of 4 panels stays in the
//! core's L2 cache while every row tile passes over it. Sums are in f32 like candle's and
//! torch's; only the order of the additions differs (values agree to ~1e-6 relative).
//!
//! CPUs without AVX-512 keep candle's `matmul` ([`PackedF32::available`] is false there).

use crate::error::{Error, Result};

/// Output columns per packed panel (two 16-lane vectors).
pub(crate) const NR: usize = 32;
/// Activation rows per micro-tile.
const MR: usize = 12;
/// Length of one chunk of the reduction axis.
const KC: usize = 384;
/// Panels that one pass over the row tiles covers (their chunk stays in L2).
const PANELS_PER_SWEEP: usize = 4;

/// A `[n, k]` f32 weight matrix packed for [`PackedF32::matmul`].
#[derive(Debug, Clone)]
pub struct PackedF32 {
    n: usize,
    k: usize,
    /// `[panel][k][NR]`, the columns past `n` zero.
    data: Vec<f32>,
}

impl PackedF32 {
    /// Whether this CPU runs the kernel (AVX-512F). `FIRSTKD_F32_KERNEL=candle` turns it off,
    /// for benchmarks and for comparing the two.
    pub fn available() -> bool {
        if std::env::var("FIRSTKD_F32_KERNEL").as_deref() == Ok("candle") {
            return false;
        }
        Self::supported()
    }

    fn supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Packs a row-major `[n, k]` matrix.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Result<Self> {
        Self::pack_in(w, n, k, true)
    }

    /// [`pack`](Self::pack) on the calling thread, for small matrices inside a task that is
    /// already one of many in parallel.
    pub(crate) fn pack_serial(w: &[f32], n: usize, k: usize) -> Result<Self> {
        Self::pack_in(w, n, k, false)
    }

    /// [`pack_transposed`](Self::pack_transposed) on the calling thread.
    pub(crate) fn pack_transposed_serial(v: &[f32], k: usize, n: usize) -> Result<Self> {
        Self::pack_transposed_in(v, k, n, false)
    }

    fn pack_in(w: &[f32], n: usize, k: usize, parallel: bool) -> Result<Self> {
        Self::pack_with(w, n, k, parallel, |panel, p| {
            for c in 0..NR.min(n - p * NR) {
                let row = &w[(p * NR + c) * k..(p * NR + c + 1) * k];
                for (i, &v) in row.iter().enumerate() {
                    panel[i * NR + c] = v;
                }
            }
        })
    }

    /// Packs `W^T` for a row-major `[k, n]` matrix `v` (so that [`matmul`](Self::matmul)
    /// computes `x v`): the layout's rows of 32 columns are contiguous in `v`, so this is a
    /// sequence of 128-byte copies.
    pub fn pack_transposed(v: &[f32], k: usize, n: usize) -> Result<Self> {
        Self::pack_transposed_in(v, k, n, true)
    }

    fn pack_transposed_in(v: &[f32], k: usize, n: usize, parallel: bool) -> Result<Self> {
        Self::pack_with(v, n, k, parallel, |panel, p| {
            let (c0, width) = (p * NR, NR.min(n - p * NR));
            for (i, dst) in panel.chunks_exact_mut(NR).enumerate() {
                dst[..width].copy_from_slice(&v[i * n + c0..i * n + c0 + width]);
            }
        })
    }

    /// Checks the shape and fills each panel (`[k][NR]`, zeroed) with `fill(panel, index)`.
    fn pack_with(
        values: &[f32],
        n: usize,
        k: usize,
        parallel: bool,
        fill: impl Fn(&mut [f32], usize) + Sync,
    ) -> Result<Self> {
        use rayon::prelude::*;
        if n == 0 || k == 0 || values.len() != n * k {
            return Err(Error::Internal(format!(
                "f32 matrix of {} values cannot hold {n} x {k}",
                values.len()
            )));
        }
        let mut data = vec![0f32; n.div_ceil(NR) * k * NR];
        if parallel {
            data.par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(p, panel)| fill(panel, p));
        } else {
            data.chunks_mut(k * NR)
                .enumerate()
                .for_each(|(p, panel)| fill(panel, p));
        }
        Ok(Self { n, k, data })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.k
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// The row-major `[n, k]` matrix again.
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        for (row, dst) in w.chunks_exact_mut(self.k).enumerate() {
            let panel = &self.data[(row / NR) * self.k * NR..];
            for (i, d) in dst.iter_mut().enumerate() {
                *d = panel[i * NR + row % NR];
            }
        }
        w
    }

    /// `x W^T` for row-major `x` of `[m, k]`: row-major `[m, n]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.matmul_with(x, m, false)
    }

    /// `x^T W^T` for row-major `x` of `[k, m]` (the weight gradient `dY^T X` of a linear
    /// layer, with this matrix packed from `X` by [`pack_transposed`](Self::pack_transposed)).
    pub fn matmul_transposed(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.matmul_with(x, m, true)
    }

    fn matmul_with(&self, x: &[f32], m: usize, transposed: bool) -> Result<Vec<f32>> {
        if x.len() != m * self.k {
            return Err(Error::Internal(format!(
                "f32 product of {} activations with a [{}, {}] weight",
                x.len(),
                self.n,
                self.k
            )));
        }
        if !Self::supported() {
            return Err(Error::InvalidArgument(
                "this CPU has no AVX-512 for the packed f32 kernel".to_string(),
            ));
        }
        let ld = self.panels() * NR;
        let mut out: Vec<f32> = Vec::with_capacity(m * ld);
        if m > 0 {
            let a = pack_rows(x, m, self.k, transposed);
            // SAFETY: `out` has room for m * ld floats; run writes every one of them (the first
            // chunk of the reduction axis stores every tile) before the length is set.
            unsafe {
                self.run(&a, m, out.as_mut_ptr(), ld);
                out.set_len(m * ld);
            }
        }
        Ok(drop_padding(out, ld, self.n))
    }

    /// # Safety
    /// `out` must be valid for `m * ld` floats, `ld >= panels * NR`, `a` from [`pack_rows`]
    /// of `m` rows, and the CPU must have AVX-512F.
    unsafe fn run(&self, a: &[f32], m: usize, out: *mut f32, ld: usize) {
        use rayon::prelude::*;
        #[derive(Clone, Copy)]
        struct Out(*mut f32);
        // SAFETY: tasks write disjoint column ranges of the output.
        unsafe impl Send for Out {}
        unsafe impl Sync for Out {}
        impl Out {
            // A method, so that closures capture the whole `Send` wrapper.
            fn get(self) -> *mut f32 {
                self.0
            }
        }
        let panels = self.panels();
        let threads = rayon::current_num_threads().max(1);
        let per_task = panels.div_ceil(threads * 2).max(1);
        let tasks = panels.div_ceil(per_task);
        let out = Out(out);
        (0..tasks).into_par_iter().for_each(|t| {
            let (lo, hi) = (t * per_task, ((t + 1) * per_task).min(panels));
            let mut k0 = 0;
            while k0 < self.k {
                let kc = KC.min(self.k - k0);
                let mut p0 = lo;
                while p0 < hi {
                    let p1 = (p0 + PANELS_PER_SWEEP).min(hi);
                    let mut row = 0;
                    while row < m {
                        let rows = MR.min(m - row);
                        for p in p0..p1 {
                            let tile = Tile {
                                a: a.as_ptr().add(row * self.k + k0 * MR),
                                w: self.data.as_ptr().add(p * self.k * NR + k0 * NR),
                                kc,
                                out: out.get().add(row * ld + p * NR),
                                ld,
                                accumulate: k0 > 0,
                                rows,
                            };
                            #[cfg(target_arch = "x86_64")]
                            x86::tile(&tile);
                        }
                        row += rows;
                    }
                    p0 = p1;
                }
                k0 += kc;
            }
        });
    }
}

/// Activations packed for [`PackedF32::product_into`]: `[tile][k][MR]` as [`pack_rows`] makes
/// them, but built serially from a strided block, for small products inside a task that is
/// already one of many in parallel (the attention kernels of `trainer::fused`).
pub(crate) struct PackedRows {
    m: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedRows {
    /// `m` rows of `k` values, row `r` at `x[r * ld..]`; or, `transposed`, the transpose of
    /// `k` rows of `m` values, row `i` at `x[i * ld..]`.
    pub(crate) fn new(x: &[f32], m: usize, k: usize, ld: usize, transposed: bool) -> Result<Self> {
        let (rows, cols) = if transposed { (k, m) } else { (m, k) };
        let need = if rows == 0 { 0 } else { (rows - 1) * ld + cols };
        if k == 0 || cols > ld || x.len() < need {
            return Err(Error::Internal(format!(
                "block of {} values cannot hold {rows} rows of {cols} with stride {ld}",
                x.len()
            )));
        }
        let mut data = vec![0f32; m.div_ceil(MR) * k * MR];
        for (t, tile) in data.chunks_exact_mut(k * MR).enumerate() {
            let rows = MR.min(m - t * MR);
            if transposed {
                for (i, dst) in tile.chunks_exact_mut(MR).enumerate() {
                    let src = i * ld + t * MR;
                    dst[..rows].copy_from_slice(&x[src..src + rows]);
                }
            } else {
                for r in 0..rows {
                    let src = &x[(t * MR + r) * ld..(t * MR + r) * ld + k];
                    for (i, &v) in src.iter().enumerate() {
                        tile[i * MR + r] = v;
                    }
                }
            }
        }
        Ok(Self { m, k, data })
    }
}

impl PackedF32 {
    /// Serial `out = A W'^T` (or `out += ...` when `accumulate`), where `W'` is this matrix's
    /// reduction axis `k0..k0 + a.k` and the output columns of `panels` (column 0 of `out` is
    /// the first column of panel `panels.start`; rows of `out` are `ld` apart, and every
    /// panel's 32 columns are written, the zero padding past [`rows`](Self::rows) included).
    pub(crate) fn product_into(
        &self,
        a: &PackedRows,
        k0: usize,
        panels: std::ops::Range<usize>,
        out: &mut [f32],
        ld: usize,
        accumulate: bool,
    ) -> Result<()> {
        let width = panels.len() * NR;
        let need = if a.m == 0 { 0 } else { (a.m - 1) * ld + width };
        if k0 + a.k > self.k || panels.end > self.panels() || width > ld || out.len() < need {
            return Err(Error::Internal(format!(
                "block product of {} x {} at k {k0} with panels {panels:?} of a [{}, {}] matrix \
                 into {} values of stride {ld}",
                a.m,
                a.k,
                self.n,
                self.k,
                out.len()
            )));
        }
        if !Self::supported() {
            return Err(Error::InvalidArgument(
                "this CPU has no AVX-512 for the packed f32 kernel".to_string(),
            ));
        }
        let mut c0 = 0;
        while c0 < a.k {
            let kc = KC.min(a.k - c0);
            let mut row = 0;
            while row < a.m {
                let rows = MR.min(a.m - row);
                for (j, p) in panels.clone().enumerate() {
                    // SAFETY: the checks above keep every pointer in bounds: `a` holds
                    // `a.m.div_ceil(MR)` tiles of `a.k * MR`, panel `p` holds `self.k * NR`
                    // values from `k0 + c0 + kc <= self.k`, and `out` the `rows` rows of
                    // `ld` from `row * ld + j * NR` with 32 columns each; the CPU has AVX-512F.
                    unsafe {
                        let tile = Tile {
                            a: a.data.as_ptr().add(row * a.k + c0 * MR),
                            w: self.data.as_ptr().add(p * self.k * NR + (k0 + c0) * NR),
                            kc,
                            out: out.as_mut_ptr().add(row * ld + j * NR),
                            ld,
                            accumulate: accumulate || c0 > 0,
                            rows,
                        };
                        #[cfg(target_arch = "x86_64")]
                        x86::tile(&tile);
                    }
                }
                row += rows;
            }
            c0 += kc;
        }
        Ok(())
    }

    /// Padded width of the output of `n` columns: whole panels.
    pub(crate) fn padded(n: usize) -> usize {
        n.div_ceil(NR) * NR
    }
}

/// Rows of `ld` values cut to their first `n` (the zero columns that pad a matrix to whole
/// panels); `out` itself when there are none.
pub(crate) fn drop_padding(out: Vec<f32>, ld: usize, n: usize) -> Vec<f32> {
    if ld == n {
        return out;
    }
    let mut packed = Vec::with_capacity(out.len() / ld.max(1) * n);
    for row in out.chunks_exact(ld) {
        packed.extend_from_slice(&row[..n]);
    }
    packed
}

/// Activations `[m, k]` (or, `transposed`, the transpose of a row-major `[k, m]`) rearranged
/// into tiles of [`MR`] rows, `[tile][k][MR]` (rows past `m` zero), so that a micro-tile reads
/// one contiguous stream.
fn pack_rows(x: &[f32], m: usize, k: usize, transposed: bool) -> Vec<f32> {
    use rayon::prelude::*;
    let tiles = m.div_ceil(MR);
    let mut a = vec![0f32; tiles * k * MR];
    a.par_chunks_mut(k * MR).enumerate().for_each(|(t, tile)| {
        let rows = MR.min(m - t * MR);
        if transposed {
            for (i, dst) in tile.chunks_exact_mut(MR).enumerate() {
                dst[..rows].copy_from_slice(&x[i * m + t * MR..i * m + t * MR + rows]);
            }
            return;
        }
        for r in 0..rows {
            let src = &x[(t * MR + r) * k..(t * MR + r + 1) * k];
            for (i, &v) in src.iter().enumerate() {
                tile[i * MR + r] = v;
            }
        }
    });
    a
}

/// One micro-tile: `rows` rows of a packed tile (`[k][MR]`) times a panel chunk of `kc` x 32.
struct Tile {
    a: *const f32,
    w: *const f32,
    kc: usize,
    out: *mut f32,
    ld: usize,
    /// Add to the output (later chunks of the reduction axis) instead of storing.
    accumulate: bool,
    rows: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, MR, NR};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F; the pointers of `tile` valid for its rows, `kc` and 32 columns.
    pub(super) unsafe fn tile(t: &Tile) {
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match t.rows { $($r => kernel::<$r>(t),)* _ => unreachable!("tile of {} rows", t.rows) }
            };
        }
        const _: () = assert!(MR == 12 && NR == 32);
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const R: usize>(t: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for i in 0..t.kc {
            let w0 = _mm512_loadu_ps(t.w.add(i * NR));
            let w1 = _mm512_loadu_ps(t.w.add(i * NR + 16));
            let a = t.a.add(i * MR);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(r));
                acc[0] = _mm512_fmadd_ps(x, w0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, w1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let dst = t.out.add(r * t.ld);
            if t.accumulate {
                _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), acc[0]));
                _mm512_storeu_ps(
                    dst.add(16),
                    _mm512_add_ps(_mm512_loadu_ps(dst.add(16)), acc[1]),
                );
            } else {
                _mm512_storeu_ps(dst, acc[0]);
                _mm512_storeu_ps(dst.add(16), acc[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_product_matches_f64() {
        if !PackedF32::supported() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        // Remainders in rows (13 = 12 + 1), columns (45) and chunks of the reduction (KC + 5).
        for &(m, n, k) in &[(1, 1, 1), (13, 45, 70), (25, 64, KC + 5), (12, 96, 2 * KC)] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let packed = PackedF32::pack(&w, n, k).unwrap();
            assert_eq!(packed.unpack(), w);
            let got = packed.matmul(&x, m).unwrap();
            assert_eq!(got.len(), m * n);
            for r in 0..m {
                for c in 0..n {
                    let want: f64 = (0..k)
                        .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                        .sum();
                    let g = got[r * n + c] as f64;
                    assert!(
                        (g - want).abs() < 1e-5 * (k as f64).sqrt(),
                        "[{m},{n},{k}] ({r},{c}): {g} vs {want}"
                    );
                }
            }
        }
        // The transposed forms: x v for v [k, n], and x^T v for x [k, m].
        let (m, n, k) = (13, 37, 29);
        let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let v: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
        let got = PackedF32::pack_transposed(&v, k, n)
            .unwrap()
            .matmul(&x, m)
            .unwrap();
        let xt: Vec<f32> = (0..k * m).map(|j| x[(j % m) * k + j / m]).collect();
        let got_t = PackedF32::pack_transposed(&v, k, n)
            .unwrap()
            .matmul_transposed(&xt, m)
            .unwrap();
        for r in 0..m {
            for c in 0..n {
                let want: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * v[i * n + c] as f64)
                    .sum();
                for g in [got[r * n + c], got_t[r * n + c]] {
                    assert!((g as f64 - want).abs() < 1e-5, "({r},{c}): {g} vs {want}");
                }
            }
        }
        let p = PackedF32::pack(&[1.0; 6], 2, 3).unwrap();
        assert!(p.matmul(&[1.0; 4], 1).is_err());
        assert!(PackedF32::pack(&[1.0; 5], 2, 3).is_err());
        assert!(p.matmul(&[], 0).unwrap().is_empty());
    }
}
