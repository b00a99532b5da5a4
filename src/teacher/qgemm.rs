//! Integer matrix products for the CPU teacher (`--compute int16` and `--compute int8`):
//! weights and activations are quantised symmetrically in blocks of [`QB`] values along the
//! reduction axis, one f32 scale per block (the scheme of llama.cpp's `Q8_0 x Q8_0`). Within a
//! block the products are summed exactly in i32; across blocks in f32. Outliers only cost
//! precision inside their own block, which matters for Qwen2's large activation outliers.
//!
//! Two widths ([`Precision`]): int8 (W8A8: 4 products per 32-bit lane per instruction, the
//! fastest, but measured far from the f32 labels: docs/benchmarks.md), and int16 (weights to
//! 12 bits, activations to 13 bits: 2 products per lane, twice the f32 FMA rate, with labels
//! within f32 rounding noise). The widths are chosen so that a block's i32 sum cannot overflow:
//! `QB * 4094 * 8191 < 2^31`.
//!
//! Three kernels, chosen once at run time ([`Kernel::detect`]):
//! * `avx512-vnni`: `vpdpwssd` (int16, 32 products per instruction) or `vpdpbusd` (int8, 64).
//!   For int8 the activations are stored with an offset of 128 (u8); the offset's
//!   contribution, `128 * sum(w)` per column and block, is precomputed when the weights are
//!   packed and subtracted per block.
//! * `avx2`: `vpmaddwd` (int16), or `vpmaddubsw` + `vpmaddwd` with the sign trick (int8:
//!   `|w|` x `sign(w) * a`, both within +-127 so the 16-bit pair sums cannot saturate).
//! * `scalar`: plain loops, for other CPUs and as the tests' reference.
//!
//! Weights are packed once into panels of [`NR`] output columns: for panel `p`, block `b`
//! and group `g` of 4 bytes (4 int8 or 2 int16 values), the 4 bytes of each of the 32 columns
//! are adjacent, so one 64-byte load feeds 16 output columns.

use crate::error::{Error, Result};

/// Values per quantisation block along the reduction axis.
pub const QB: usize = 64;
/// Output columns per packed panel.
const NR: usize = 32;
/// Activation rows per micro-tile of the AVX-512 kernel.
const MR512: usize = 6;
/// Activation rows per micro-tile of the AVX2 kernel.
const MR256: usize = 4;
/// Bytes of one panel's 4-value group: 32 columns x 4 bytes.
const GROUP_BYTES: usize = NR * 4;
/// Panels whose weights one task keeps hot in the core's L2 cache while it sweeps the rows.
const PANELS_PER_SWEEP: usize = 4;

/// Width of the quantised values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// 8-bit weights and activations (|q| <= 127).
    Int8,
    /// 12-bit weights (|q| <= 4094) and 13-bit activations (|q| <= 8191), stored as int16.
    Int16,
}

impl Precision {
    fn wide(self) -> bool {
        self == Precision::Int16
    }

    /// Bytes per value.
    fn size(self) -> usize {
        if self.wide() {
            2
        } else {
            1
        }
    }

    /// Values per 4-byte group.
    fn group(self) -> usize {
        4 / self.size()
    }

    fn weight_limit(self) -> f32 {
        if self.wide() {
            4094.0
        } else {
            127.0
        }
    }

    fn act_limit(self) -> f32 {
        if self.wide() {
            8191.0
        } else {
            127.0
        }
    }

    /// Name for provenance, e.g. `int16`.
    pub fn as_str(self) -> &'static str {
        if self.wide() {
            "int16"
        } else {
            "int8"
        }
    }
}

const _: () = assert!((QB as u64) * 4094 * 8191 < (1u64 << 31));

/// The instruction set a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 with VNNI (`vpdpbusd`): Intel Cascade Lake and later, AMD Zen 4 and later.
    Avx512Vnni,
    /// AVX2 (`vpmaddubsw`): any x86-64 CPU since 2013.
    Avx2,
    /// Portable loops.
    Scalar,
}

impl Kernel {
    /// The best kernel this CPU supports. `FIRSTKD_INT8_KERNEL=avx2|scalar` picks a slower one
    /// (for benchmarks and tests); a kernel the CPU lacks is never chosen.
    pub fn detect() -> Self {
        let best = Self::best_supported();
        match std::env::var("FIRSTKD_INT8_KERNEL").as_deref() {
            Ok("scalar") => Kernel::Scalar,
            Ok("avx2") if best != Kernel::Scalar => Kernel::Avx2,
            _ => best,
        }
    }

    fn best_supported() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                return Kernel::Avx512Vnni;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Scalar
    }

    /// Whether this CPU can run the kernel.
    pub fn supported(self) -> bool {
        match (self, Self::best_supported()) {
            (Kernel::Scalar, _) => true,
            (Kernel::Avx2, best) => best != Kernel::Scalar,
            (Kernel::Avx512Vnni, best) => best == Kernel::Avx512Vnni,
        }
    }

    /// Name for provenance and benchmark tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Kernel::Avx512Vnni => "avx512-vnni",
            Kernel::Avx2 => "avx2",
            Kernel::Scalar => "scalar",
        }
    }

    /// Whether int8 activations carry the +128 offset (u8) rather than being signed.
    fn unsigned_acts(self, precision: Precision) -> bool {
        self == Kernel::Avx512Vnni && precision == Precision::Int8
    }
}

/// A `[n, k]` weight matrix (`y = x W^T`), quantised and packed for [`matmul`].
#[derive(Debug, Clone)]
pub struct QWeight {
    n: usize,
    k: usize,
    precision: Precision,
    /// Blocks per row (`k` padded up to a multiple of [`QB`]).
    blocks: usize,
    /// `[panel][block][group][column][4 bytes]`: int8 values, or little-endian int16 ones.
    data: Vec<u8>,
    /// `[panel][block][column]` scales.
    scales: Vec<f32>,
    /// `[panel][block][column]`: `128 * sum` of the block's int8 values (the VNNI offset;
    /// zero for int16).
    offsets: Vec<i32>,
}

impl QWeight {
    /// Quantises a row-major `[n, k]` f32 matrix.
    pub fn quantize(w: &[f32], n: usize, k: usize, precision: Precision) -> Result<Self> {
        if n == 0 || k == 0 || w.len() != n * k {
            return Err(Error::Internal(format!(
                "int8 weight of {} values cannot be a [{n}, {k}] matrix",
                w.len()
            )));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "weight value {} at row {}, column {} is not finite",
                w[i],
                i / k,
                i % k
            )));
        }
        use rayon::prelude::*;
        let blocks = k.div_ceil(QB);
        let panels = n.div_ceil(NR);
        let (size, group, limit) = (
            precision.size(),
            precision.group(),
            precision.weight_limit(),
        );
        let block_bytes = QB * NR * size;
        let mut data = vec![0u8; panels * blocks * block_bytes];
        let mut scales = vec![0f32; panels * blocks * NR];
        let mut offsets = vec![0i32; panels * blocks * NR];
        data.par_chunks_mut(blocks * block_bytes)
            .zip(scales.par_chunks_mut(blocks * NR))
            .zip(offsets.par_chunks_mut(blocks * NR))
            .enumerate()
            .for_each(|(p, ((data, scales), offsets))| {
                for col in 0..NR.min(n - p * NR) {
                    let row = p * NR + col;
                    let src = &w[row * k..(row + 1) * k];
                    for b in 0..blocks {
                        let vals = &src[b * QB..((b + 1) * QB).min(k)];
                        let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let scale = amax / limit;
                        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                        let mut sum = 0i32;
                        let base = b * block_bytes;
                        for (i, &v) in vals.iter().enumerate() {
                            let q = (v * inv).round_ties_even().clamp(-limit, limit) as i16;
                            sum += q as i32;
                            let at =
                                base + (i / group) * GROUP_BYTES + col * 4 + (i % group) * size;
                            data[at..at + size].copy_from_slice(&q.to_le_bytes()[..size]);
                        }
                        scales[b * NR + col] = scale;
                        offsets[b * NR + col] = if precision.wide() { 0 } else { 128 * sum };
                    }
                }
            });
        Ok(Self {
            n,
            k,
            precision,
            blocks,
            data,
            scales,
            offsets,
        })
    }

    /// Output features (rows of `W`).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features (columns of `W`).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// The width of the values.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * (self.scales.len() + self.offsets.len())
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// The dequantised value at `(row, col)` (for tests).
    #[cfg(test)]
    fn value(&self, row: usize, col: usize) -> f32 {
        let (p, c) = (row / NR, row % NR);
        let (b, i) = (col / QB, col % QB);
        let (size, group) = (self.precision.size(), self.precision.group());
        let base = (p * self.blocks + b) * QB * NR * size;
        let at = base + (i / group) * GROUP_BYTES + c * 4 + (i % group) * size;
        load_value(&self.data[at..], self.precision) as f32
            * self.scales[(p * self.blocks + b) * NR + c]
    }
}

/// Quantised activations: `[m, blocks * QB]` values and `[m, blocks]` scales.
struct QActs {
    m: usize,
    blocks: usize,
    /// Bytes per row.
    row_bytes: usize,
    data: Vec<u8>,
    scales: Vec<f32>,
}

/// How activation values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// int8, two's complement.
    Signed8,
    /// int8 + 128 as u8 (the VNNI int8 kernel).
    Offset8,
    /// int16, little-endian, |q| <= 8191.
    Signed16,
}

impl Encoding {
    fn of(kernel: Kernel, precision: Precision) -> Self {
        match precision {
            Precision::Int16 => Encoding::Signed16,
            Precision::Int8 if kernel.unsigned_acts(precision) => Encoding::Offset8,
            Precision::Int8 => Encoding::Signed8,
        }
    }

    fn size(self) -> usize {
        if self == Encoding::Signed16 {
            2
        } else {
            1
        }
    }

    fn limit(self) -> f32 {
        if self == Encoding::Signed16 {
            Precision::Int16.act_limit()
        } else {
            Precision::Int8.act_limit()
        }
    }
}

/// Quantises `[m, k]` activations for `kernel`, rows split across threads.
fn quantize_acts(x: &[f32], m: usize, k: usize, kernel: Kernel, precision: Precision) -> QActs {
    use rayon::prelude::*;
    let enc = Encoding::of(kernel, precision);
    let blocks = k.div_ceil(QB);
    let row_bytes = blocks * QB * enc.size();
    let mut data = vec![0u8; m * row_bytes];
    let mut scales = vec![0f32; m * blocks];
    let rows_per_task = (1 << 16) / row_bytes.max(1) + 1;
    data.par_chunks_mut(rows_per_task * row_bytes)
        .zip(scales.par_chunks_mut(rows_per_task * blocks))
        .enumerate()
        .for_each(|(t, (d, s))| {
            for (r, (drow, srow)) in d
                .chunks_mut(row_bytes)
                .zip(s.chunks_mut(blocks))
                .enumerate()
            {
                let row = t * rows_per_task + r;
                quantize_row(&x[row * k..(row + 1) * k], drow, srow, enc);
            }
        });
    QActs {
        m,
        blocks,
        row_bytes,
        data,
        scales,
    }
}

fn quantize_row(x: &[f32], out: &mut [u8], scales: &mut [f32], enc: Encoding) {
    #[cfg(target_arch = "x86_64")]
    if x.len() * enc.size() == out.len()
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU supports AVX2; `x` and `out` hold whole blocks of QB values.
        unsafe { x86::quantize_row_avx2(x, out, scales, enc) };
        return;
    }
    quantize_row_portable(x, out, scales, enc)
}

fn quantize_row_portable(x: &[f32], out: &mut [u8], scales: &mut [f32], enc: Encoding) {
    let limit = enc.limit();
    let size = enc.size();
    for (b, (dst, scale)) in out
        .chunks_exact_mut(QB * size)
        .zip(scales.iter_mut())
        .enumerate()
    {
        let src = &x[(b * QB).min(x.len())..((b + 1) * QB).min(x.len())];
        let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = amax / limit;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        *scale = s;
        for (i, d) in dst.chunks_exact_mut(size).enumerate() {
            let q = src.get(i).map_or(0, |&v| {
                (v * inv).round_ties_even().clamp(-limit, limit) as i16
            });
            match enc {
                Encoding::Signed8 => d[0] = q as i8 as u8,
                Encoding::Offset8 => d[0] = (q + 128) as u8,
                Encoding::Signed16 => d.copy_from_slice(&q.to_le_bytes()),
            }
        }
    }
}

/// One stored value as an integer (int8 byte or little-endian int16).
fn load_value(bytes: &[u8], precision: Precision) -> i32 {
    match precision {
        Precision::Int8 => bytes[0] as i8 as i32,
        Precision::Int16 => i16::from_le_bytes([bytes[0], bytes[1]]) as i32,
    }
}

/// `y = x W^T` for row-major `x` of `[m, w.cols()]`: returns row-major `[m, w.rows()]`.
pub fn matmul(x: &[f32], m: usize, w: &QWeight, kernel: Kernel) -> Result<Vec<f32>> {
    if x.len() != m * w.k {
        return Err(Error::Internal(format!(
            "int8 product of {} activations with a [{}, {}] weight: not a multiple of its {} columns",
            x.len(),
            w.n,
            w.k,
            w.k
        )));
    }
    if w.blocks == 0 || m == 0 {
        return Ok(vec![0f32; m * w.n]);
    }
    if !kernel.supported() {
        return Err(Error::InvalidArgument(format!(
            "this CPU cannot run the {} int8 kernel",
            kernel.as_str()
        )));
    }
    let acts = quantize_acts(x, m, w.k, kernel, w.precision);
    let ld = w.panels() * NR;
    // Not zeroed: the kernels write every element of every tile.
    let mut out: Vec<f32> = Vec::with_capacity(m * ld);
    // SAFETY: `out` has room for m * ld floats and the kernel is supported (checked above);
    // run_panels writes all m * ld elements (every panel of every row) before the length is set.
    unsafe {
        run_panels(&acts, w, kernel, out.as_mut_ptr(), ld);
        out.set_len(m * ld);
    }
    Ok(super::sgemm::drop_padding(out, ld, w.n))
}

/// A pointer to the output that tasks writing disjoint columns share.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of columns of the output (see run_panels).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Splits the panels over the rayon pool; each task sweeps every row for its panels.
///
/// # Safety
/// `out` must be valid for `acts.m * ld` floats with `ld >= w.panels() * NR`, and `kernel`
/// supported by this CPU.
unsafe fn run_panels(acts: &QActs, w: &QWeight, kernel: Kernel, out: *mut f32, ld: usize) {
    use rayon::prelude::*;
    let panels = w.panels();
    let threads = rayon::current_num_threads().max(1);
    // About four tasks per thread for balance, each at least one panel.
    let per_task = panels.div_ceil(threads * 4).max(1);
    let tasks = panels.div_ceil(per_task);
    let ptr = OutPtr(out);
    (0..tasks).into_par_iter().for_each(|t| {
        let lo = t * per_task;
        let hi = ((t + 1) * per_task).min(panels);
        let mut p0 = lo;
        while p0 < hi {
            let p1 = (p0 + PANELS_PER_SWEEP).min(hi);
            // SAFETY: this task only writes columns [p0 * NR, p1 * NR) of every row, which no
            // other task writes; the kernels stay within rows 0..m of `out`.
            unsafe { sweep(acts, w, kernel, p0..p1, ptr.get(), ld) };
            p0 = p1;
        }
    });
}

/// Computes output columns of `panels` for every row.
///
/// # Safety
/// `out` must point to `acts.m * ld` writable floats, `ld >= w.panels() * NR`, and no other
/// thread may access the columns of `panels` concurrently.
unsafe fn sweep(
    acts: &QActs,
    w: &QWeight,
    kernel: Kernel,
    panels: std::ops::Range<usize>,
    out: *mut f32,
    ld: usize,
) {
    let mr = match kernel {
        Kernel::Avx512Vnni => MR512,
        Kernel::Avx2 => MR256,
        Kernel::Scalar => 1,
    };
    let mut row = 0;
    while row < acts.m {
        let rows = mr.min(acts.m - row);
        for p in panels.clone() {
            let tile = Tile {
                acts,
                w,
                row,
                rows,
                panel: p,
                out: out.add(row * ld + p * NR),
                ld,
            };
            match kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512Vnni => x86::vnni_tile(&tile),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => x86::avx2_tile(&tile),
                _ => scalar_tile(&tile),
            }
        }
        row += rows;
    }
}

/// One micro-tile: `rows` activation rows from `row` times one panel of 32 columns.
struct Tile<'a> {
    acts: &'a QActs,
    w: &'a QWeight,
    row: usize,
    rows: usize,
    panel: usize,
    /// Top-left output element of the tile.
    out: *mut f32,
    /// Output row stride.
    ld: usize,
}

impl Tile<'_> {
    fn act_row(&self, r: usize) -> &[u8] {
        let len = self.acts.row_bytes;
        &self.acts.data[(self.row + r) * len..(self.row + r + 1) * len]
    }

    fn act_scales(&self, r: usize) -> &[f32] {
        let b = self.acts.blocks;
        &self.acts.scales[(self.row + r) * b..(self.row + r + 1) * b]
    }

    fn weights(&self) -> &[u8] {
        let len = self.w.blocks * QB * NR * self.w.precision.size();
        &self.w.data[self.panel * len..(self.panel + 1) * len]
    }

    fn weight_scales(&self) -> &[f32] {
        let len = self.w.blocks * NR;
        &self.w.scales[self.panel * len..(self.panel + 1) * len]
    }

    fn weight_offsets(&self) -> &[i32] {
        let len = self.w.blocks * NR;
        &self.w.offsets[self.panel * len..(self.panel + 1) * len]
    }
}

/// # Safety
/// `tile.out` must be valid for `tile.rows` rows of 32 floats at stride `tile.ld`.
unsafe fn scalar_tile(tile: &Tile<'_>) {
    let (wd, ws) = (tile.weights(), tile.weight_scales());
    let p = tile.w.precision;
    let (size, group) = (p.size(), p.group());
    for r in 0..tile.rows {
        let (a, sa) = (tile.act_row(r), tile.act_scales(r));
        let mut acc = [0f32; NR];
        for b in 0..tile.w.blocks {
            for (c, acc) in acc.iter_mut().enumerate() {
                let mut dot = 0i32;
                for i in 0..QB {
                    let at =
                        b * QB * NR * size + (i / group) * GROUP_BYTES + c * 4 + (i % group) * size;
                    let wv = load_value(&wd[at..], p);
                    dot += wv * load_value(&a[(b * QB + i) * size..], p);
                }
                *acc += dot as f32 * (ws[b * NR + c] * sa[b]);
            }
        }
        let dst = std::slice::from_raw_parts_mut(tile.out.add(r * tile.ld), NR);
        dst.copy_from_slice(&acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn kernels() -> Vec<Kernel> {
        [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512Vnni]
            .into_iter()
            .filter(|k| k.supported())
            .collect()
    }

    /// Shapes with row, column and block remainders; an activation outlier in one block.
    #[test]
    fn kernels_agree_with_the_dequantised_product_and_with_f32() {
        let shapes = [(1, 32, 32), (7, 45, 70), (13, 96, 576), (6, 64, 33)];
        for (&(m, n, k), precision) in shapes
            .iter()
            .flat_map(|s| [(s, Precision::Int8), (s, Precision::Int16)])
        {
            let mut x = pseudo_random(m * k, 1 + (m * n * k) as u64);
            x[k / 2] = 40.0; // an outlier: only its own block loses precision
            let wf = pseudo_random(n * k, 7 + n as u64);
            let w = QWeight::quantize(&wf, n, k, precision).unwrap();
            // Reference: f32 products of the dequantised weights and activations.
            let acts = quantize_acts(&x, m, k, Kernel::Scalar, precision);
            let size = precision.size();
            let mut deq = vec![0f64; m * n];
            let mut exact = vec![0f64; m * n];
            // Rounding bound: half a step of each operand times the other, summed.
            let mut bound = vec![0f64; m * n];
            for r in 0..m {
                for c in 0..n {
                    for i in 0..k {
                        let sa = acts.scales[r * acts.blocks + i / QB] as f64;
                        let sw = w.scales[((c / NR) * w.blocks + i / QB) * NR + c % NR] as f64;
                        let at = r * acts.row_bytes + i * size;
                        let a = load_value(&acts.data[at..], precision) as f64 * sa;
                        deq[r * n + c] += a * w.value(c, i) as f64;
                        let (xf, wv) = (x[r * k + i] as f64, wf[c * k + i] as f64);
                        exact[r * n + c] += xf * wv;
                        bound[r * n + c] +=
                            sa / 2.0 * wv.abs() + sw / 2.0 * xf.abs() + sa * sw / 4.0;
                    }
                }
            }
            let norm = (k as f64).sqrt();
            for kernel in kernels() {
                let got = matmul(&x, m, &w, kernel).unwrap();
                assert_eq!(got.len(), m * n);
                for i in 0..m * n {
                    let g = got[i] as f64;
                    assert!(
                        (g - deq[i]).abs() < 1e-4 * norm * (1.0 + deq[i].abs()),
                        "{kernel:?} {precision:?} [{m},{n},{k}] #{i}: {g} vs dequantised {}",
                        deq[i]
                    );
                    assert!(
                        (g - exact[i]).abs() <= bound[i] * 1.0001 + 1e-5,
                        "{kernel:?} {precision:?} [{m},{n},{k}] #{i}: {g} vs f32 {} (bound {})",
                        exact[i],
                        bound[i]
                    );
                }
            }
        }
    }

    #[test]
    fn kernels_handle_zero_blocks_and_extremes() {
        let (m, n, k) = (5, 33, 64);
        let mut x = vec![0f32; m * k];
        x[3] = 1e30; // a huge value does not overflow the i32 sums
        x[k + 40] = -1e-30;
        let mut wf = vec![0f32; n * k];
        wf[3] = 1.0;
        wf[k + 40] = -127.0;
        for precision in [Precision::Int8, Precision::Int16] {
            let w = QWeight::quantize(&wf, n, k, precision).unwrap();
            for kernel in kernels() {
                let got = matmul(&x, m, &w, kernel).unwrap();
                assert!((got[0] - 1e30).abs() < 1e24, "{kernel:?}: {}", got[0]);
                assert!(got.iter().all(|v| v.is_finite()), "{kernel:?}");
                let tiny = got[n + 1];
                assert!(
                    tiny > 0.0 && tiny < 2e-28,
                    "{kernel:?} {precision:?}: {tiny}"
                );
            }
        }
        // The largest values of a full int16 block sum without overflow.
        let (x, wf) = (vec![-3.0f32; QB], vec![-5.0f32; QB]);
        let w = QWeight::quantize(&wf, 1, QB, Precision::Int16).unwrap();
        for kernel in kernels() {
            let got = matmul(&x, 1, &w, kernel).unwrap();
            assert!(
                (got[0] - 15.0 * QB as f32).abs() < 1e-2,
                "{kernel:?}: {}",
                got[0]
            );
        }
    }

    #[test]
    fn vectorised_quantisation_equals_the_portable_loops() {
        let k = 4 * QB;
        let mut x = pseudo_random(k, 3);
        x[5] = 0.5 / 127.0 * 3.0; // near a rounding tie after scaling
        x[QB..2 * QB].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
        for enc in [Encoding::Signed8, Encoding::Offset8, Encoding::Signed16] {
            let (mut a, mut sa) = (vec![0u8; k * enc.size()], vec![0f32; 4]);
            let (mut b, mut sb) = (vec![0u8; k * enc.size()], vec![0f32; 4]);
            quantize_row(&x, &mut a, &mut sa, enc);
            quantize_row_portable(&x, &mut b, &mut sb, enc);
            assert_eq!(a, b, "{enc:?}");
            assert_eq!(sa, sb);
        }
    }

    #[test]
    fn bad_shapes_and_values_are_refused() {
        assert!(QWeight::quantize(&[1.0; 6], 2, 4, Precision::Int8).is_err());
        assert!(QWeight::quantize(&[1.0, f32::NAN], 1, 2, Precision::Int16).is_err());
        let w = QWeight::quantize(&[1.0; 64], 2, 32, Precision::Int8).unwrap();
        assert!(matmul(&[1.0; 33], 1, &w, Kernel::Scalar).is_err());
        assert!(matmul(&[], 0, &w, Kernel::Scalar).unwrap().is_empty());
    }
}
