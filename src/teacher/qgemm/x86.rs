//! The x86-64 kernels of [`super`]: AVX2 and AVX-512 (VNNI) activation quantisation and
//! int8 micro-tiles. Every function here is `unsafe` and needs the CPU features it names.

use super::{Encoding, Precision, Tile, GROUP_BYTES, MR256, MR512, NR, QB};
use std::arch::x86_64::*;

/// [`super::quantize_row_portable`] for rows of whole blocks, 8 lanes at a time: the same
/// scale, and `vcvtps2dq` rounds to nearest even like `round_ties_even`.
///
/// # Safety
/// The CPU must support AVX2; `out.len() == x.len() * enc.size()`, `x.len()` a multiple
/// of QB, and `scales.len() >= x.len() / QB`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_row_avx2(
    x: &[f32],
    out: &mut [u8],
    scales: &mut [f32],
    enc: Encoding,
) {
    const V: usize = QB / 8;
    let limit = enc.limit();
    let sign = _mm256_set1_ps(-0.0);
    let bias = _mm256_set1_epi32(if enc == Encoding::Offset8 { 128 } else { 0 });
    let lim = _mm256_set1_ps(limit);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, scale) in scales.iter_mut().enumerate().take(x.len() / QB) {
        let src = x.as_ptr().add(b * QB);
        let mut v = [_mm256_setzero_ps(); V];
        let mut m = _mm256_setzero_ps();
        for (i, v) in v.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(src.add(8 * i));
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *v));
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
        let s = _mm_cvtss_f32(m) / limit;
        *scale = s;
        let inv = _mm256_set1_ps(if s > 0.0 { 1.0 / s } else { 0.0 });
        let q = |j: usize| {
            let y = _mm256_min_ps(_mm256_mul_ps(v[j], inv), lim);
            let y = _mm256_max_ps(y, _mm256_sub_ps(_mm256_setzero_ps(), lim));
            _mm256_add_epi32(_mm256_cvtps_epi32(y), bias)
        };
        let dst = out.as_mut_ptr().add(b * QB * enc.size());
        if enc == Encoding::Signed16 {
            // 2 x 8 i32 -> 16 i16; packs interleave 128-bit lanes, the permute restores order.
            for i in (0..V).step_by(2) {
                let w = _mm256_permute4x64_epi64(_mm256_packs_epi32(q(i), q(i + 1)), 0b11_01_10_00);
                _mm256_storeu_si256(dst.add(16 * i) as *mut __m256i, w);
            }
        } else {
            // 4 x 8 i32 -> 32 bytes.
            for i in (0..V).step_by(4) {
                let lo = _mm256_packs_epi32(q(i), q(i + 1));
                let hi = _mm256_packs_epi32(q(i + 2), q(i + 3));
                let bytes = if enc == Encoding::Offset8 {
                    _mm256_packus_epi16(lo, hi)
                } else {
                    _mm256_packs_epi16(lo, hi)
                };
                let bytes = _mm256_permutevar8x32_epi32(bytes, order);
                _mm256_storeu_si256(dst.add(8 * i) as *mut __m256i, bytes);
            }
        }
    }
}

/// # Safety
/// The CPU must support AVX-512F/BW/VNNI; `tile.out` as in [`super::scalar_tile`].
pub(super) unsafe fn vnni_tile(tile: &Tile<'_>) {
    macro_rules! rows {
        ($wide:literal) => {
            match tile.rows {
                6 => vnni::<6, $wide>(tile),
                5 => vnni::<5, $wide>(tile),
                4 => vnni::<4, $wide>(tile),
                3 => vnni::<3, $wide>(tile),
                2 => vnni::<2, $wide>(tile),
                _ => vnni::<1, $wide>(tile),
            }
        };
    }
    const _: () = assert!(MR512 == 6);
    if tile.w.precision == Precision::Int16 {
        rows!(true)
    } else {
        rows!(false)
    }
}

/// `acc += x . w` by `vpdpwssd`, in inline assembly: LLVM's machine combiner otherwise splits
/// most `_mm512_dpwssd_epi32` calls into `vpmaddwd` + `vpaddd` (to shorten the dependency
/// chain on CPUs it does not know to have a fast `vpdpwssd`), which issues twice the
/// instructions and halved the int16 kernel's rate (docs/benchmarks.md, "peak multiply rates").
/// A macro rather than a function, so that it expands inside the `avx512vnni` function.
macro_rules! dpwssd {
    ($acc:expr, $x:expr, $w:expr) => {
        std::arch::asm!(
            "vpdpwssd {acc}, {x}, {w}",
            acc = inout(zmm_reg) $acc,
            x = in(zmm_reg) $x,
            w = in(zmm_reg) $w,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
}

/// `WIDE`: int16 values, `vpdpwssd`; otherwise int8 with offset activations, `vpdpbusd`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni<const R: usize, const WIDE: bool>(tile: &Tile<'_>) {
    let size = if WIDE { 2 } else { 1 };
    let blocks = tile.w.blocks;
    let w = tile.weights().as_ptr();
    let ws = tile.weight_scales().as_ptr();
    let wo = tile.weight_offsets().as_ptr();
    let mut a = [std::ptr::null::<u8>(); R];
    let mut sa = [std::ptr::null::<f32>(); R];
    for r in 0..R {
        a[r] = tile.act_row(r).as_ptr();
        sa[r] = tile.act_scales(r).as_ptr();
    }
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for b in 0..blocks {
        let mut dot = [[_mm512_setzero_si512(); 2]; R];
        let wb = w.add(b * QB * NR * size);
        let ab = b * QB * size;
        for g in 0..QB * size / 4 {
            let w0 = _mm512_loadu_si512(wb.add(g * GROUP_BYTES) as *const _);
            let w1 = _mm512_loadu_si512(wb.add(g * GROUP_BYTES + 64) as *const _);
            for r in 0..R {
                let x = (a[r].add(ab + g * 4) as *const i32).read_unaligned();
                let x = _mm512_set1_epi32(x);
                if WIDE {
                    dpwssd!(dot[r][0], x, w0);
                    dpwssd!(dot[r][1], x, w1);
                } else {
                    dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], x, w0);
                    dot[r][1] = _mm512_dpbusd_epi32(dot[r][1], x, w1);
                }
            }
        }
        let s0 = _mm512_loadu_ps(ws.add(b * NR));
        let s1 = _mm512_loadu_ps(ws.add(b * NR + 16));
        if !WIDE {
            let o0 = _mm512_loadu_si512(wo.add(b * NR) as *const _);
            let o1 = _mm512_loadu_si512(wo.add(b * NR + 16) as *const _);
            for d in dot.iter_mut() {
                d[0] = _mm512_sub_epi32(d[0], o0);
                d[1] = _mm512_sub_epi32(d[1], o1);
            }
        }
        for r in 0..R {
            let s = _mm512_set1_ps(*sa[r].add(b));
            let d0 = _mm512_cvtepi32_ps(dot[r][0]);
            let d1 = _mm512_cvtepi32_ps(dot[r][1]);
            acc[r][0] = _mm512_fmadd_ps(d0, _mm512_mul_ps(s0, s), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(d1, _mm512_mul_ps(s1, s), acc[r][1]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let dst = tile.out.add(r * tile.ld);
        _mm512_storeu_ps(dst, acc[0]);
        _mm512_storeu_ps(dst.add(16), acc[1]);
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA; `tile.out` as in [`super::scalar_tile`].
pub(super) unsafe fn avx2_tile(tile: &Tile<'_>) {
    macro_rules! rows {
        ($wide:literal) => {
            match tile.rows {
                4 => avx2::<4, $wide>(tile),
                3 => avx2::<3, $wide>(tile),
                2 => avx2::<2, $wide>(tile),
                _ => avx2::<1, $wide>(tile),
            }
        };
    }
    const _: () = assert!(MR256 == 4);
    if tile.w.precision == Precision::Int16 {
        rows!(true)
    } else {
        rows!(false)
    }
}

/// Each call covers one half (16 columns) of the panel at a time to fit in 16 registers.
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<const R: usize, const WIDE: bool>(tile: &Tile<'_>) {
    let size = if WIDE { 2 } else { 1 };
    let blocks = tile.w.blocks;
    let w = tile.weights().as_ptr();
    let ws = tile.weight_scales().as_ptr();
    let ones = _mm256_set1_epi16(1);
    let mut a = [std::ptr::null::<u8>(); R];
    let mut sa = [std::ptr::null::<f32>(); R];
    for r in 0..R {
        a[r] = tile.act_row(r).as_ptr();
        sa[r] = tile.act_scales(r).as_ptr();
    }
    for half in 0..2 {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for b in 0..blocks {
            let mut dot = [[_mm256_setzero_si256(); 2]; R];
            let wb = w.add(b * QB * NR * size + half * 64);
            let ab = b * QB * size;
            for g in 0..QB * size / 4 {
                let w0 = _mm256_loadu_si256(wb.add(g * GROUP_BYTES) as *const _);
                let w1 = _mm256_loadu_si256(wb.add(g * GROUP_BYTES + 32) as *const _);
                if WIDE {
                    for r in 0..R {
                        let x = (a[r].add(ab + g * 4) as *const i32).read_unaligned();
                        let x = _mm256_set1_epi32(x);
                        dot[r][0] = _mm256_add_epi32(dot[r][0], _mm256_madd_epi16(x, w0));
                        dot[r][1] = _mm256_add_epi32(dot[r][1], _mm256_madd_epi16(x, w1));
                    }
                } else {
                    let (u0, u1) = (_mm256_abs_epi8(w0), _mm256_abs_epi8(w1));
                    for r in 0..R {
                        let x = (a[r].add(ab + g * 4) as *const i32).read_unaligned();
                        let x = _mm256_set1_epi32(x);
                        let p0 = _mm256_maddubs_epi16(u0, _mm256_sign_epi8(x, w0));
                        let p1 = _mm256_maddubs_epi16(u1, _mm256_sign_epi8(x, w1));
                        dot[r][0] = _mm256_add_epi32(dot[r][0], _mm256_madd_epi16(p0, ones));
                        dot[r][1] = _mm256_add_epi32(dot[r][1], _mm256_madd_epi16(p1, ones));
                    }
                }
            }
            let s0 = _mm256_loadu_ps(ws.add(b * NR + half * 16));
            let s1 = _mm256_loadu_ps(ws.add(b * NR + half * 16 + 8));
            for r in 0..R {
                let s = _mm256_set1_ps(*sa[r].add(b));
                let d0 = _mm256_cvtepi32_ps(dot[r][0]);
                let d1 = _mm256_cvtepi32_ps(dot[r][1]);
                acc[r][0] = _mm256_fmadd_ps(d0, _mm256_mul_ps(s0, s), acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(d1, _mm256_mul_ps(s1, s), acc[r][1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let dst = tile.out.add(r * tile.ld + half * 16);
            _mm256_storeu_ps(dst, acc[0]);
            _mm256_storeu_ps(dst.add(8), acc[1]);
        }
    }
}
