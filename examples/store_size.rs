//! Measures the labels table's size per token for float16 vs float32 log-probs (k = 5) on a
//! seeded synthetic store, and the largest probability error float16 storage introduces.
//!
//! Run: cargo run --release --example store_size -- [ROWS] [OUT_DIR]
//! (defaults: 1,000,000 rows, a temporary directory). Prints a Markdown table.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use arrow::array::AsArray;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float32Type, UInt32Type};
use firstkd::schema::{LogprobDtype, Table};
use firstkd::store::synthetic::{generate, SyntheticConfig};
use firstkd::store::{StoreReader, WriterOptions};

/// One label row: top-k ids, top-k log-probs, target log-prob.
type Row = (Vec<u32>, Vec<f32>, f32);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let rows: u64 = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir()?;
    let base = args
        .get(2)
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    println!("| dtype | label rows | labels bytes | bytes/token | write s | read s |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut stores = Vec::new();
    for dtype in [LogprobDtype::Float32, LogprobDtype::Float16] {
        let dir = base.join(format!("store-{}", dtype.name()));
        let cfg = SyntheticConfig {
            label_rows: rows,
            seed: 42,
            logprob_dtype: dtype,
            ..SyntheticConfig::default()
        };
        let start = Instant::now();
        let m = generate(&dir, &cfg, WriterOptions::default())?;
        let write_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let reader = StoreReader::open(&dir)?;
        let mut n = 0;
        for b in reader.batches(Table::Labels, None, 65536)? {
            n += b?.num_rows();
        }
        let read_s = start.elapsed().as_secs_f64();
        let bytes = m.bytes(Table::Labels);
        println!(
            "| {} | {} | {} | {:.3} | {:.2} | {:.2} |",
            dtype.name(),
            n,
            bytes,
            bytes as f64 / n as f64,
            write_s,
            read_s
        );
        stores.push(dir);
    }
    // Max probability error of float16: compare the two stores id by id.
    let read = |dir: &PathBuf| -> Result<Vec<Row>, Box<dyn std::error::Error>> {
        let reader = StoreReader::open(dir)?;
        let mut out = Vec::new();
        for b in reader.batches(
            Table::Labels,
            Some(&["topk_ids", "topk_logprobs", "target_logprob"]),
            65536,
        )? {
            let b = b?;
            let ids = b
                .column(0)
                .as_fixed_size_list()
                .values()
                .as_primitive::<UInt32Type>()
                .values()
                .to_vec();
            let lps = cast(
                b.column(1).as_fixed_size_list().values(),
                &DataType::Float32,
            )?;
            let lps = lps.as_primitive::<Float32Type>().values().to_vec();
            let t = cast(b.column(2), &DataType::Float32)?;
            let t = t.as_primitive::<Float32Type>();
            for i in 0..b.num_rows() {
                out.push((
                    ids[i * 5..i * 5 + 5].to_vec(),
                    lps[i * 5..i * 5 + 5].to_vec(),
                    t.value(i),
                ));
            }
        }
        Ok(out)
    };
    let (a, b) = (read(&stores[0])?, read(&stores[1])?);
    let (mut max_err, mut max_target_err, mut max_mass_err) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        let exact: HashMap<u32, f32> = x.0.iter().copied().zip(x.1.iter().copied()).collect();
        let (mut m32, mut m16) = (0f64, 0f64);
        for (id, lp16) in y.0.iter().zip(&y.1) {
            let lp32 = exact[id];
            let (p32, p16) = (f64::from(lp32).exp(), f64::from(*lp16).exp());
            max_err = max_err.max((p32 - p16).abs());
            m32 += p32;
            m16 += p16;
        }
        max_mass_err = max_mass_err.max((m32 - m16).abs());
        max_target_err = max_target_err.max((f64::from(x.2).exp() - f64::from(y.2).exp()).abs());
    }
    println!();
    println!("float16 vs float32 over {} rows: max |p16 - p32| per top-k entry = {max_err:.3e}, of the top-k mass = {max_mass_err:.3e}, of the target probability = {max_target_err:.3e}", a.len());
    Ok(())
}
