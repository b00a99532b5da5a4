//! The CPU's peak multiply rate per instruction family: what bounds the teacher's and the
//! trainer's matrix products on this machine. Each instruction runs in 12 independent
//! accumulator chains (enough to hide its latency), in one thread per core, with no memory
//! traffic, so the rates are the instruction's throughput and nothing else.
//!
//! ```text
//! cargo run --release --example peak_rates -- [THREADS] [REPEATS]
//! ```
//! Prints a Markdown table: per instruction, the multiplies (products summed) per second for the
//! whole machine (median of REPEATS runs, default 5; THREADS defaults to the available
//! parallelism) and the ratio to the f32 FMA of the same width. Instructions the CPU lacks are
//! reported as such (`is_x86_feature_detected!`).

use std::time::Instant;

/// Iterations of the 12-chain loop per run.
const ITERS: usize = 20_000_000;
const CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CHAINS, ITERS};
    use std::arch::x86_64::*;

    /// Runs `step` on each of [`CHAINS`] accumulators (all starting at `init`) [`ITERS`] times.
    macro_rules! chains {
        ($init:expr, |$a:ident| $step:expr) => {{
            let mut acc = [$init; CHAINS];
            for _ in 0..ITERS {
                for $a in acc.iter_mut() {
                    *$a = $step;
                }
            }
            acc
        }};
    }

    /// The sum of the 8 lanes of each 256-bit accumulator, as f32.
    #[target_feature(enable = "avx2")]
    unsafe fn sum256(acc: &[__m256; CHAINS]) -> f32 {
        let mut out = [0f32; 8];
        acc.iter()
            .map(|a| {
                _mm256_storeu_ps(out.as_mut_ptr(), *a);
                out.iter().sum::<f32>()
            })
            .sum()
    }

    /// 16 f32 multiplies per instruction.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma512() -> f32 {
        let b = _mm512_set1_ps(1.0e-7);
        let acc = chains!(_mm512_setzero_ps(), |a| _mm512_fmadd_ps(b, b, *a));
        acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum()
    }

    /// 8 f32 multiplies per instruction.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma256() -> f32 {
        let b = _mm256_set1_ps(1.0e-7);
        sum256(&chains!(_mm256_setzero_ps(), |a| _mm256_fmadd_ps(b, b, *a)))
    }

    /// 32 int16 multiplies per instruction (`--compute int16` on AVX-512 VNNI).
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn dpwssd() -> f32 {
        let b = _mm512_set1_epi16(1);
        let acc = chains!(_mm512_setzero_si512(), |a| _mm512_dpwssd_epi32(*a, b, b));
        acc.iter().map(|a| _mm512_reduce_add_epi32(*a) as f32).sum()
    }

    /// 64 int8 multiplies per instruction (`--compute int8` on AVX-512 VNNI).
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn dpbusd() -> f32 {
        let b = _mm512_set1_epi8(1);
        let acc = chains!(_mm512_setzero_si512(), |a| _mm512_dpbusd_epi32(*a, b, b));
        acc.iter().map(|a| _mm512_reduce_add_epi32(*a) as f32).sum()
    }

    /// 16 int16 multiplies per instruction (`--compute int16` on AVX2: `vpmaddwd` + add). The
    /// products are taken of the accumulators themselves, so the compiler cannot hoist them.
    #[target_feature(enable = "avx2")]
    pub unsafe fn maddwd256() -> f32 {
        let b = _mm256_set1_epi16(1);
        let acc = chains!(_mm256_set1_epi16(1), |a| _mm256_add_epi32(
            b,
            _mm256_madd_epi16(*a, b)
        ));
        sum256(&acc.map(|a| _mm256_cvtepi32_ps(a)))
    }

    /// 32 bf16 multiplies per instruction (AVX512-BF16 `vdpbf16ps`).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dpbf16() -> f32 {
        let b: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3380)); // about 6e-8
        let acc = chains!(_mm512_setzero_ps(), |a| _mm512_dpbf16_ps(*a, b, b));
        acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum()
    }
}

struct Probe {
    name: &'static str,
    /// Multiplies per instruction.
    per_instr: f64,
    /// The f32 FMA row of the same vector width.
    baseline: &'static str,
    supported: bool,
    run: fn() -> f32,
}

fn probes() -> Vec<Probe> {
    #[cfg(target_arch = "x86_64")]
    {
        let f512 = is_x86_feature_detected!("avx512f");
        let vnni = f512 && is_x86_feature_detected!("avx512vnni");
        let bf16 = f512 && is_x86_feature_detected!("avx512bf16");
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        // SAFETY (every closure): each runs only when `supported`, the features its
        // `target_feature` names having been detected on this CPU.
        vec![
            Probe {
                name: "vfmadd231ps zmm (f32, AVX-512)",
                per_instr: 16.0,
                baseline: "zmm",
                supported: f512,
                run: || unsafe { x86::fma512() },
            },
            Probe {
                name: "vpdpwssd zmm (int16, VNNI)",
                per_instr: 32.0,
                baseline: "zmm",
                supported: vnni,
                run: || unsafe { x86::dpwssd() },
            },
            Probe {
                name: "vpdpbusd zmm (int8, VNNI)",
                per_instr: 64.0,
                baseline: "zmm",
                supported: vnni,
                run: || unsafe { x86::dpbusd() },
            },
            Probe {
                name: "vdpbf16ps zmm (bf16, AVX512-BF16)",
                per_instr: 32.0,
                baseline: "zmm",
                supported: bf16,
                run: || unsafe { x86::dpbf16() },
            },
            Probe {
                name: "vfmadd231ps ymm (f32, AVX2)",
                per_instr: 8.0,
                baseline: "ymm",
                supported: avx2,
                run: || unsafe { x86::fma256() },
            },
            Probe {
                name: "vpmaddwd + vpaddd ymm (int16, AVX2)",
                per_instr: 16.0,
                baseline: "ymm",
                supported: avx2,
                run: || unsafe { x86::maddwd256() },
            },
        ]
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// Multiplies per second of `probe` over `threads` threads, median of `repeats` runs.
fn rate(probe: &Probe, threads: usize, repeats: usize) -> f64 {
    let mut rates: Vec<f64> = (0..repeats)
        .map(|_| {
            let started = Instant::now();
            let sink: f32 = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads).map(|_| s.spawn(probe.run)).collect();
                handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
            });
            let secs = started.elapsed().as_secs_f64();
            std::hint::black_box(sink);
            (ITERS * CHAINS * threads) as f64 * probe.per_instr / secs
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads = args
        .first()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    let repeats: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5).max(1);
    println!(
        "threads: {threads}; median of {repeats} runs; {CHAINS} independent chains per thread"
    );
    println!(
        "| instruction | multiplies per instruction | G multiplies/s | vs f32 FMA of that width |"
    );
    println!("|---|---:|---:|---:|");
    let probes = probes();
    let mut base: Vec<(&str, f64)> = Vec::new();
    for p in &probes {
        if !p.supported {
            println!("| {} | {} | not on this CPU | - |", p.name, p.per_instr);
            continue;
        }
        let r = rate(p, threads, repeats);
        let is_base = p.name.starts_with("vfmadd231ps");
        if is_base {
            base.push((p.baseline, r));
        }
        let vs = base
            .iter()
            .find(|(b, _)| *b == p.baseline)
            .map(|(_, b)| format!("{:.2}", r / b))
            .unwrap_or_else(|| "-".into());
        println!("| {} | {} | {:.1} | {vs} |", p.name, p.per_instr, r / 1e9);
    }
}
