//! Matrix-product benchmark for the teacher's layers: candle's f32 `matmul` (the `gemm` crate)
//! against firstkd's AVX-512 f32 kernel (`firstkd::teacher::sgemm`) and its int16 / int8
//! products (`firstkd::teacher::qgemm`, every kernel this CPU runs), on
//! the shapes of SmolLM2-135M and Qwen2.5-Coder-1.5B with 2,048 tokens per batch.
//!
//! ```text
//! cargo run --release --example matmul_bench -- [REPEATS]
//! ```
//! Prints a Markdown table: median seconds per product over REPEATS (default 5) runs after one
//! warm-up, the GFLOP/s (2 m n k per product) and the speed-up over candle. Threads: rayon's
//! default (`RAYON_NUM_THREADS`).

use std::time::Instant;

use candle_core::{Device, Tensor};
use firstkd::teacher::qgemm::{matmul, Kernel, Precision, QWeight};
use firstkd::teacher::sgemm::PackedF32;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..repeats)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let repeats: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5);
    let m = 2048;
    let shapes = [
        ("SmolLM2-135M qkv", 960, 576),
        ("SmolLM2-135M gate+up", 3072, 576),
        ("SmolLM2-135M down", 576, 1536),
        ("SmolLM2-135M output (vocab)", 49152, 576),
        ("Qwen2.5-1.5B qkv", 2048, 1536),
        ("Qwen2.5-1.5B gate+up", 17920, 1536),
        ("Qwen2.5-1.5B down", 1536, 8960),
    ];
    let kernels: Vec<(Kernel, Precision)> = [Kernel::Avx512Vnni, Kernel::Avx2]
        .into_iter()
        .filter(|k| k.supported())
        .flat_map(|k| [(k, Precision::Int16), (k, Precision::Int8)])
        .collect();
    println!("threads: {}", rayon::current_num_threads());
    print!(
        "| layer | m x n x k | f32 (candle) s | f32 GFLOP/s | f32 avx512 s | GFLOP/s | speed-up |"
    );
    for (k, p) in &kernels {
        print!(" {} {} s | GFLOP/s | speed-up |", p.as_str(), k.as_str());
    }
    println!();
    print!("|---|---|---:|---:|---:|---:|---:|");
    for _ in &kernels {
        print!("---:|---:|---:|");
    }
    println!();
    for (name, n, k) in shapes {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu)?;
        let flops = 2.0 * (m * n * k) as f64;
        let f32_s = time(repeats, || {
            let _ = x.matmul(&w.t().expect("t")).expect("matmul");
        });
        print!(
            "| {name} | {m} x {n} x {k} | {f32_s:.4} | {:.0} |",
            flops / f32_s / 1e9
        );
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let ws: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let pw = PackedF32::pack(&ws, n, k)?;
        let s = time(repeats, || {
            let _ = pw.matmul(&xs, m).expect("f32 matmul");
        });
        print!(" {s:.4} | {:.0} | {:.2} |", flops / s / 1e9, f32_s / s);
        for &(kernel, precision) in &kernels {
            let qw = QWeight::quantize(&ws, n, k, precision)?;
            let s = time(repeats, || {
                let _ = matmul(&xs, m, &qw, kernel).expect("int8 matmul");
            });
            print!(" {s:.4} | {:.0} | {:.2} |", flops / s / 1e9, f32_s / s);
        }
        println!();
    }
    Ok(())
}
