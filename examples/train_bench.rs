//! Training-step benchmark: a 2-layer SmolLM2-shaped student (hidden 576, 9 heads, 3 KV heads,
//! ffn 1536, vocab 49152, tied embeddings), batches of 4 x 256 tokens from a synthetic store,
//! loss + backward + clipping + AdamW per step, f32 on the CPU. `FIRSTKD_BENCH_SEQ=S` (128, 256,
//! 512 or 1024) trains on 1024 / S rows of S tokens instead (the same 1024 tokens per step).
//!
//! ```text
//! cargo run --release --example train_bench -- [STEPS] [LOSS...]
//! FIRSTKD_DEVICE=cuda FIRSTKD_PRECISION=bf16 train_bench ...   # a `cuda` build on a GPU
//! ```
//! Prints one table row per loss (default: kd, kd-tail, ce): median step time split into
//! forward / backward / clip + AdamW, tokens/s and the process's peak RSS after that loss's
//! steps (VmHWM; it only grows).
//!
//! `FIRSTKD_BENCH_SHAPE=qwen0.5b` trains a randomly initialised Qwen2.5-0.5B-shaped student
//! (24 layers, hidden 896, vocab 151,936, tied) instead; `FIRSTKD_BENCH_TOKENS=N` sets the
//! tokens per step (default 1024; rows of `FIRSTKD_BENCH_SEQ`). The table then also gives the
//! model TFLOP/s (6 x the projections' and output parameters x tokens, plus causal attention
//! 12 x layers x heads x head_dim x (S + 1) / 2 per token) and the MFU against
//! `FIRSTKD_PEAK_TFLOPS` (default on cuda: 989, the H200's dense bf16 peak).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use firstkd::store::synthetic::{generate, SyntheticConfig};
use firstkd::store::{StoreReader, WriterOptions};
use firstkd::trainer::optim::{clip_scale, global_norm};
use firstkd::trainer::{
    batch_loss, AdamW, AdamWParams, BatchStream, DataOptions, KdKind, LossKind, LossSpec, Student,
    StudentConfig,
};

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As the `firstkd` binary does (FIRSTKD_SYSTEM_MALLOC=1 turns it off, to compare).
    let tuned = firstkd::runtime::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(6);
    let losses: Vec<String> = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec!["kd".into(), "kd-tail".into(), "ce".into()]
    };
    let seq: usize = match std::env::var("FIRSTKD_BENCH_SEQ") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("FIRSTKD_BENCH_SEQ={v}: not a number"))?,
        Err(_) => 256,
    };
    let step_tokens: usize = match std::env::var("FIRSTKD_BENCH_TOKENS") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("FIRSTKD_BENCH_TOKENS={v}: not a number"))?,
        Err(_) => 1024,
    };
    if seq == 0 || seq > step_tokens || !step_tokens.is_multiple_of(seq) {
        return Err(format!("FIRSTKD_BENCH_SEQ={seq}: must divide {step_tokens}").into());
    }
    let rows = step_tokens / seq;
    let shape = std::env::var("FIRSTKD_BENCH_SHAPE").unwrap_or_else(|_| "2-layer".into());
    let student_json = match shape.as_str() {
        "2-layer" => serde_json::json!({
            "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 2, "num_attention_heads": 9, "num_key_value_heads": 3,
            "vocab_size": 49152, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "tie_word_embeddings": true
        }),
        "qwen0.5b" => serde_json::json!({
            "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "tie_word_embeddings": true
        }),
        other => return Err(format!("FIRSTKD_BENCH_SHAPE={other}: 2-layer or qwen0.5b").into()),
    };
    let vocab = student_json["vocab_size"].as_u64().unwrap_or(49152) as u32;
    let tmp = std::env::temp_dir().join(format!("firstkd-train-bench-{}", std::process::id()));
    let store = tmp.join("store");
    let cfg = SyntheticConfig {
        label_rows: step_tokens as u64 * (steps as u64 + 2) * 2,
        min_len: seq + 1,
        max_len: seq + 1,
        vocab_size: vocab,
        valid_fraction: 0.0,
        ..SyntheticConfig::default()
    };
    generate(&store, &cfg, WriterOptions::default())?;
    let reader = StoreReader::open(&store)?;
    let student_cfg: StudentConfig = serde_json::from_value(student_json)?;
    let device = match std::env::var("FIRSTKD_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0)?,
        _ => Device::Cpu,
    };
    let dtype = match std::env::var("FIRSTKD_PRECISION").as_deref() {
        Ok("bf16") => DType::BF16,
        _ => DType::F32,
    };
    let flops_per_step = {
        let c = &student_cfg;
        let (h, nq) = (c.hidden_size as f64, c.num_attention_heads as f64);
        let hd = h / nq;
        let nkv = c.num_key_value_heads.unwrap_or(c.num_attention_heads) as f64;
        let per_layer =
            h * (nq + 2.0 * nkv) * hd + nq * hd * h + 3.0 * h * c.intermediate_size as f64;
        let matmul_params = c.num_hidden_layers as f64 * per_layer + c.vocab_size as f64 * h;
        let attn = 12.0 * c.num_hidden_layers as f64 * nq * hd * (seq as f64 + 1.0) / 2.0;
        (6.0 * matmul_params + attn) * step_tokens as f64
    };
    let peak_tflops: Option<f64> = match std::env::var("FIRSTKD_PEAK_TFLOPS") {
        Ok(v) => Some(v.parse().map_err(|_| format!("FIRSTKD_PEAK_TFLOPS={v}"))?),
        Err(_) => (!device.is_cpu()).then_some(989.0),
    };
    println!(
        "student: {shape}, {} layers, {} parameters; batch {rows} x {seq}; device {device:?}, matmuls {dtype:?}; threads: {}; malloc keeps freed memory: {tuned}",
        student_cfg.num_hidden_layers,
        student_cfg.num_parameters(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("| loss | steps | median step s | forward s | backward s | clip+AdamW s | tokens/s | peak RSS MiB | model TFLOP/s | MFU |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for name in &losses {
        let mut student = Student::random(student_cfg.clone(), 0, &device)?;
        student.set_compute_dtype(dtype)?;
        let mut opt = AdamW::new(student.vars(), AdamWParams::default())?;
        let spec = LossSpec {
            kind: LossKind::parse(name)?,
            temperature: firstkd::Temperature::ONE,
            alpha: 0.5,
            mix_kd: KdKind::Kd,
            label_smoothing: 0.0,
            teacher_smoothing: 0.0,
        };
        let data = DataOptions {
            split: "train".into(),
            batch_tokens: step_tokens,
            max_positions: seq,
            shuffle_buffer: 1,
            seed: 0,
            epochs: None,
            pack: false,
        };
        let mut stream = BatchStream::new(reader.clone(), data)?;
        let vars = student.vars().to_vec();
        let mut times = Vec::new();
        for step in 0..=steps {
            let batch = stream.next().ok_or("store exhausted")??;
            let started = Instant::now();
            let (sum, n) = batch_loss(&student, &batch, &spec, 5, 256, None)?;
            let _ = sum.to_scalar::<f32>()?;
            let t_fwd = started.elapsed().as_secs_f64();
            let grads_store = (sum / n as f64)?.backward()?;
            device.synchronize()?;
            let t_bwd = started.elapsed().as_secs_f64();
            let grads: Vec<Tensor> = vars
                .iter()
                .map(|(_, v)| match grads_store.get(v.as_tensor()) {
                    Some(g) => Ok(g.detach()),
                    None => v.as_tensor().zeros_like(),
                })
                .collect::<candle_core::Result<_>>()?;
            let norm = global_norm(&grads)?;
            opt.step_scaled(&grads, 1e-4, clip_scale(norm, Some(1.0)))?;
            device.synchronize()?;
            let secs = started.elapsed().as_secs_f64();
            if step > 0 {
                times.push((secs, t_fwd, t_bwd - t_fwd, secs - t_bwd)); // step 0 is warm-up
            }
        }
        times.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (median, fwd, bwd, opt_s) = times[times.len() / 2];
        let tflops = flops_per_step / median / 1e12;
        println!(
            "| {name} | {steps} | {median:.3} | {fwd:.3} | {bwd:.3} | {opt_s:.3} | {:.0} | {:.0} | {tflops:.3} | {} |",
            step_tokens as f64 / median,
            peak_rss_mib(),
            peak_tflops.map_or("-".to_string(), |p| format!("{:.1}% of {p}", 100.0 * tflops / p))
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
