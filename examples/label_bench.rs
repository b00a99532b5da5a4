//! Teacher labelling throughput and model FLOP utilisation (MFU): the engine `firstkd label`
//! runs (packed rows, top-k / entropy / target log-prob selected where the logits are, zstd
//! Parquet written on a second thread while the next batch is computed), on a model of a real
//! teacher's shape with seeded random weights (speed does not depend on the values, and no
//! weight file has to reach the machine) or on a GGUF file.
//!
//! ```text
//! cargo run --release --example label_bench -- [OPTIONS]
//! label_bench --device cuda --compute bf16 --shape qwen1.5b --tokens 1000000   # a cuda build
//! ```
//! Options (defaults in brackets): `--shape qwen1.5b|qwen0.5b|smollm2` [qwen1.5b], `--model
//! GGUF` (instead of random weights), `--device cpu|cuda` [cpu], `--compute f32|bf16|int16`
//! [f32], `--tokens N` timed tokens [65536], `--min-len A --max-len B` sequence lengths, uniform
//! [200, 1000], `--row-len R` packed row length [2048; 0 = no packing, padded batches],
//! `--batch-tokens T` tokens per forward pass [32768], `--host-select` (copy logits to the host
//! for the selection), `--peak-tflops P` the device's dense peak for the products' dtype, for
//! the MFU column [989 on cuda: H200 bf16 dense; none on the CPU], `--check N` label the first
//! N sequences again on the CPU in f32 and compare [8], `--out FILE` append the table rows.
//!
//! Model FLOPs per sequence of L tokens: `2 * P * L` for the block products (P = the
//! projections' parameters), `2 * vocab * hidden * (L - 1)` for the output products at labelled
//! positions, and `4 * layers * heads * head_dim * L (L + 1) / 2` for causal attention; masked
//! (cross-sequence) attention work in packed rows is not counted.

use std::sync::mpsc::sync_channel;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use firstkd::store::synthetic::{synthetic_meta, SyntheticConfig};
use firstkd::store::{SampleLabels, SampleRecord, StoreWriter, WriterOptions};
use firstkd::teacher::model::{Architecture, LayerWeights, ModelConfig, TeacherModel};
use firstkd::teacher::{plan_batches, plan_packed_batches, Compute, LabelInput, LabelOptions};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    shape: String,
    model: Option<String>,
    device: String,
    compute: Compute,
    tokens: usize,
    min_len: usize,
    max_len: usize,
    row_len: usize,
    batch_tokens: usize,
    host_select: bool,
    peak_tflops: Option<f64>,
    check: usize,
    out: Option<String>,
}

fn parse_args() -> BoxResult<Args> {
    let mut a = Args {
        shape: "qwen1.5b".into(),
        model: None,
        device: "cpu".into(),
        compute: Compute::F32,
        tokens: 65536,
        min_len: 200,
        max_len: 1000,
        row_len: 2048,
        batch_tokens: 32768,
        host_select: false,
        peak_tflops: None,
        check: 8,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--host-select" {
            a.host_select = true;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| -> BoxResult<usize> {
            v.parse()
                .map_err(|_| format!("{flag} {v}: not a number").into())
        };
        match flag.as_str() {
            "--shape" => a.shape = v,
            "--model" => a.model = Some(v),
            "--device" => a.device = v,
            "--compute" => {
                a.compute = match v.as_str() {
                    "f32" => Compute::F32,
                    "bf16" => Compute::Bf16,
                    "int16" => Compute::Int16,
                    "int8" => Compute::Int8,
                    _ => return Err(format!("--compute {v}: f32, bf16, int16 or int8").into()),
                }
            }
            "--tokens" => a.tokens = num(&v)?,
            "--min-len" => a.min_len = num(&v)?,
            "--max-len" => a.max_len = num(&v)?,
            "--row-len" => a.row_len = num(&v)?,
            "--batch-tokens" => a.batch_tokens = num(&v)?,
            "--peak-tflops" => {
                a.peak_tflops = Some(v.parse().map_err(|_| format!("--peak-tflops {v}"))?)
            }
            "--check" => a.check = num(&v)?,
            "--out" => a.out = Some(v),
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    if a.min_len < 2 || a.max_len < a.min_len {
        return Err("need 2 <= --min-len <= --max-len".into());
    }
    if a.row_len != 0 && a.row_len < a.max_len {
        return Err("--row-len must be 0 or at least --max-len".into());
    }
    Ok(a)
}

/// Hugging Face configs of the teachers and students users label with.
fn shape(name: &str) -> BoxResult<(ModelConfig, bool)> {
    let (arch, hidden, inter, layers, heads, kv, vocab, theta, eps) = match name {
        "qwen1.5b" => (
            Architecture::Qwen2,
            1536,
            8960,
            28,
            12,
            2,
            151936,
            1e6,
            1e-6,
        ),
        "qwen0.5b" => (Architecture::Qwen2, 896, 4864, 24, 14, 2, 151936, 1e6, 1e-6),
        "smollm2" => (Architecture::Llama, 576, 1536, 30, 9, 3, 49152, 1e5, 1e-5),
        _ => return Err(format!("--shape {name}: qwen1.5b, qwen0.5b or smollm2").into()),
    };
    let cfg = ModelConfig {
        architecture: arch,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: hidden / heads,
        vocab_size: vocab,
        context_length: 32768,
        rms_norm_eps: eps,
        rope_theta: theta,
        rope_freq_divisors: None,
    };
    Ok((cfg, true))
}

/// Seeded random weights on `device` (and a CPU copy for the check): N(0, 0.02) projections,
/// unit norms, an embedding scaled so that the tied output gives logits of std ~3.
fn random_models(
    cfg: &ModelConfig,
    device: &Device,
    cpu_copy: bool,
) -> BoxResult<(TeacherModel, Option<TeacherModel>)> {
    // A seeded generator on an accelerator; the CPU's is not seedable in candle, so there the
    // weights are drawn from a fixed-seed xorshift (any values serve for speed).
    if !device.is_cpu() {
        device.set_seed(20241201)?;
    }
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let state = std::cell::Cell::new(0x2545_f491_4f6c_dd1d_u64);
    let rand = |shape: (usize, usize), std: f64| -> candle_core::Result<Tensor> {
        if !device.is_cpu() {
            return Tensor::randn(0f32, std as f32, shape, device);
        }
        let n = shape.0 * shape.1;
        let mut s = state.get();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // Uniform on [-sqrt(3), sqrt(3)) has unit variance.
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                (u * 2.0 - 1.0) * 1.732_050_8 * std as f32
            })
            .collect();
        state.set(s);
        Tensor::from_vec(data, shape, device)
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for _ in 0..cfg.num_layers {
        let qkv_bias = if cfg.architecture.qkv_bias() {
            Some((
                rand((1, cfg.num_heads * hd), 0.02)?.flatten_all()?,
                rand((1, cfg.num_kv_heads * hd), 0.02)?.flatten_all()?,
                rand((1, cfg.num_kv_heads * hd), 0.02)?.flatten_all()?,
            ))
        } else {
            None
        };
        layers.push(LayerWeights {
            attn_norm: Tensor::ones(h, DType::F32, device)?,
            q: rand((cfg.num_heads * hd, h), 0.02)?,
            k: rand((cfg.num_kv_heads * hd, h), 0.02)?,
            v: rand((cfg.num_kv_heads * hd, h), 0.02)?,
            qkv_bias,
            o: rand((h, cfg.num_heads * hd), 0.02)?,
            ffn_norm: Tensor::ones(h, DType::F32, device)?,
            gate: rand((cfg.intermediate_size, h), 0.02)?,
            up: rand((cfg.intermediate_size, h), 0.02)?,
            down: rand((h, cfg.intermediate_size), 0.02)?,
        });
    }
    let embed = rand((cfg.vocab_size, h), 3.0 / (h as f64).sqrt())?;
    let norm = Tensor::ones(h, DType::F32, device)?;
    let cpu = if cpu_copy && !device.is_cpu() {
        let c = |t: &Tensor| t.to_device(&Device::Cpu);
        let cpu_layers = layers
            .iter()
            .map(|l| -> candle_core::Result<LayerWeights> {
                Ok(LayerWeights {
                    attn_norm: c(&l.attn_norm)?,
                    q: c(&l.q)?,
                    k: c(&l.k)?,
                    v: c(&l.v)?,
                    qkv_bias: match &l.qkv_bias {
                        Some((a, b, d)) => Some((c(a)?, c(b)?, c(d)?)),
                        None => None,
                    },
                    o: c(&l.o)?,
                    ffn_norm: c(&l.ffn_norm)?,
                    gate: c(&l.gate)?,
                    up: c(&l.up)?,
                    down: c(&l.down)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Some(TeacherModel::new(
            cfg.clone(),
            c(&embed)?,
            cpu_layers,
            c(&norm)?,
            None,
            &Device::Cpu,
        )?)
    } else if cpu_copy {
        Some(TeacherModel::new(
            cfg.clone(),
            embed.clone(),
            layers.clone(),
            norm.clone(),
            None,
            device,
        )?)
    } else {
        None
    };
    let model = TeacherModel::new(cfg.clone(), embed, layers, norm, None, device)?;
    Ok((model, cpu))
}

/// Deterministic sequences: lengths uniform in `min..=max`, ids uniform over the vocabulary.
fn sequences(n_tokens: usize, min: usize, max: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut s = seed;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut out = Vec::new();
    let mut total = 0;
    while total < n_tokens {
        let len = min + (next() as usize) % (max - min + 1);
        out.push((0..len).map(|_| (next() % vocab as u64) as u32).collect());
        total += len;
    }
    out
}

fn model_flops(cfg: &ModelConfig, lengths: &[usize]) -> f64 {
    let (h, hd, nq, nkv) = (
        cfg.hidden_size as f64,
        cfg.head_dim as f64,
        cfg.num_heads as f64,
        cfg.num_kv_heads as f64,
    );
    let per_layer =
        h * (nq + 2.0 * nkv) * hd + nq * hd * h + 3.0 * h * cfg.intermediate_size as f64;
    let blocks = cfg.num_layers as f64 * per_layer;
    lengths
        .iter()
        .map(|&l| {
            let l = l as f64;
            2.0 * blocks * l
                + 2.0 * cfg.vocab_size as f64 * h * (l - 1.0)
                + 4.0 * cfg.num_layers as f64 * nq * hd * l * (l + 1.0) / 2.0
        })
        .sum()
}

fn main() -> BoxResult<()> {
    let args = parse_args()?;
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        d if d.starts_with("cuda") => {
            let n = d.strip_prefix("cuda:").map_or(Ok(0), str::parse)?;
            Device::new_cuda(n)?
        }
        d => return Err(format!("--device {d}: cpu or cuda[:N]").into()),
    };
    let load0 = Instant::now();
    let (mut model, cpu_ref, what) = match &args.model {
        Some(path) => {
            let t = firstkd::teacher::Teacher::load(path.as_ref(), &device)?;
            let cpu = if args.check > 0 {
                Some(firstkd::teacher::Teacher::load(
                    path.as_ref(),
                    &Device::Cpu,
                )?)
            } else {
                None
            };
            let name = std::path::Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (
                t.model().clone(),
                cpu.map(|c| c.model().clone()),
                format!("{name} (GGUF)"),
            )
        }
        None => {
            let (cfg, _) = shape(&args.shape)?;
            let (m, c) = random_models(&cfg, &device, args.check > 0)?;
            (m, c, format!("{} shape, random weights", args.shape))
        }
    };
    let compute = model.set_compute(args.compute)?;
    let cfg = model.config().clone();
    eprintln!(
        "label_bench: {what}, {compute} on {:?}, loaded in {:.1} s",
        device,
        load0.elapsed().as_secs_f64()
    );
    let seqs = sequences(
        args.tokens,
        args.min_len,
        args.max_len,
        cfg.vocab_size,
        0x9e37_79b9_7f4a_7c15,
    );
    let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let pack = (args.row_len > 0).then_some(args.row_len);
    let opts = LabelOptions {
        pack,
        select_on_device: Some(!args.host_select && !device.is_cpu()),
        chunk_rows: if device.is_cpu() { 64 } else { 512 },
        ..LabelOptions::default()
    };
    let batches = match pack {
        Some(r) => plan_packed_batches(&lengths, r, args.batch_tokens),
        None => plan_batches(&lengths, args.batch_tokens),
    };
    let label = |batch: &[usize]| -> BoxResult<Vec<firstkd::teacher::SequenceLabels>> {
        let inputs: Vec<LabelInput<'_>> = batch
            .iter()
            .map(|&i| LabelInput {
                input_ids: &seqs[i],
                prompt_len: 0,
            })
            .collect();
        let ids: Vec<u64> = batch.iter().map(|&i| i as u64).collect();
        Ok(model.label_batch_seeded(&inputs, &opts, &ids)?)
    };
    // Warm-up (kernel compilation, allocator): the first batch, not timed.
    if let Some(first) = batches.first() {
        label(first)?;
    }
    let tmp = std::env::temp_dir().join(format!("firstkd-label-bench-{}", std::process::id()));
    let syn = SyntheticConfig {
        vocab_size: cfg.vocab_size as u32,
        ..SyntheticConfig::default()
    };
    let mut writer = StoreWriter::create(&tmp, synthetic_meta(&syn), WriterOptions::default())?;
    let t0 = Instant::now();
    let (tx, rx) = sync_channel::<Vec<(usize, firstkd::teacher::SequenceLabels)>>(2);
    let seqs_ref = &seqs;
    let written = std::thread::scope(|scope| -> BoxResult<u64> {
        let handle = scope.spawn(move || -> Result<u64, firstkd::Error> {
            let mut n = 0u64;
            for batch in rx {
                for (i, l) in batch {
                    let record = SampleRecord {
                        sample_id: i as u64,
                        source: "bench".into(),
                        split: "train".into(),
                        record_index: i as u64,
                        window_index: 0,
                        input_ids: seqs_ref[i].clone(),
                        prompt_len: 0,
                    };
                    writer.push(&record, &SampleLabels::from(l))?;
                    n += 1;
                    if n.is_multiple_of(256) {
                        writer.commit(serde_json::json!({ "next_seq": n }))?;
                    }
                }
            }
            writer.finish(serde_json::json!({ "next_seq": n }))?;
            Ok(n)
        });
        for batch in &batches {
            let labels = label(batch)?;
            if tx
                .send(batch.iter().copied().zip(labels).collect())
                .is_err()
            {
                break;
            }
        }
        drop(tx);
        let n = handle
            .join()
            .map_err(|_| "the writer thread panicked".to_string())??;
        Ok(n)
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let tokens: usize = lengths.iter().sum();
    let flops = model_flops(&cfg, &lengths);
    let tflops = flops / secs / 1e12;
    let peak = args
        .peak_tflops
        .or_else(|| (!device.is_cpu()).then_some(989.0));
    fn bytes_below(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| match e.file_type() {
                        Ok(t) if t.is_dir() => bytes_below(&e.path()),
                        _ => e.metadata().map_or(0, |m| m.len()),
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    let store_bytes = bytes_below(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let padded: usize = match pack {
        Some(r) => batches
            .iter()
            .map(|b| {
                let l: Vec<usize> = b.iter().map(|&i| lengths[i]).collect();
                firstkd::teacher::pack_rows(&l, r).1 * r
            })
            .sum(),
        None => batches
            .iter()
            .map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap_or(0))
            .sum(),
    };
    let header = "| model | device | compute | rows | batch tokens | selection | sequences | tokens | fill | s | tokens/s | model TFLOP/s | MFU |";
    let row = format!(
        "| {what} | {} | {} | {} | {} | {} | {written} | {tokens} | {:.3} | {secs:.2} | {:.0} | {tflops:.2} | {} |",
        if device.is_cpu() { "cpu" } else { args.device.as_str() },
        args.compute.as_str(),
        pack.map_or("padded".to_string(), |r| format!("packed {r}")),
        args.batch_tokens,
        if opts.select_on_device == Some(true) { "on device" } else { "host" },
        tokens as f64 / padded.max(1) as f64,
        tokens as f64 / secs,
        peak.map_or("-".to_string(), |p| format!("{:.1}% of {p}", 100.0 * tflops / p)),
    );
    println!("{header}\n|{}\n{row}", "---|".repeat(13));
    eprintln!("label_bench: store of {store_bytes} bytes written on the second thread");

    // Agreement with the CPU f32 reference on the first `check` sequences.
    let mut check_row = String::new();
    if let Some(cpu) = cpu_ref.filter(|_| args.check > 0) {
        let n = args.check.min(seqs.len());
        let inputs: Vec<LabelInput<'_>> = seqs[..n]
            .iter()
            .map(|s| LabelInput {
                input_ids: s,
                prompt_len: 0,
            })
            .collect();
        let ids: Vec<u64> = (0..n as u64).collect();
        let want = cpu.label_batch_seeded(&inputs, &LabelOptions::default(), &ids)?;
        let got = model.label_batch_seeded(&inputs, &opts, &ids)?;
        let (mut pos, mut top1, mut sets, mut worst, mut sum) =
            (0usize, 0usize, 0usize, 0f32, 0f64);
        for (a, b) in want.iter().zip(&got) {
            for p in 0..a.len() {
                let (x, y) = (&a.topk_ids[p * 5..p * 5 + 5], &b.topk_ids[p * 5..p * 5 + 5]);
                top1 += usize::from(x[0] == y[0]);
                let (mut xs, mut ys) = (x.to_vec(), y.to_vec());
                xs.sort_unstable();
                ys.sort_unstable();
                sets += usize::from(xs == ys);
                let d = (a.target_logprobs[p] - b.target_logprobs[p]).abs();
                worst = worst.max(d);
                sum += f64::from(d);
                pos += 1;
            }
        }
        check_row = format!(
            "| agreement | {what} | {} vs cpu f32 | {pos} | {:.4} | {:.4} | {:.2e} | {worst:.2e} |",
            args.compute.as_str(),
            top1 as f64 / pos.max(1) as f64,
            sets as f64 / pos.max(1) as f64,
            sum / pos.max(1) as f64
        );
        println!(
            "\n| check | model | labels | positions | top-1 agrees | top-5 set agrees | mean abs target lp diff | max |\n|---|---|---|---:|---:|---:|---:|---:|\n{check_row}"
        );
    }
    if let Some(path) = &args.out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{row}")?;
        if !check_row.is_empty() {
            writeln!(f, "{check_row}")?;
        }
    }
    Ok(())
}
