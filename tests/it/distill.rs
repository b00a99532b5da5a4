//! `firstkd distill` and the trainer library: learning, checkpoints, resume, bad input.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use firstkd::schema::LogprobDtype;
use firstkd::store::synthetic::{generate, synthetic_meta, SyntheticConfig};
use firstkd::store::{SampleLabels, SampleRecord, StoreWriter, WriterOptions};
use firstkd::trainer::checkpoint::{self, load_model, write_model_files};
use firstkd::trainer::{train, Init, LossKind, Student, StudentConfig, TrainOptions, TrainSummary};
use firstkd::Error;

use crate::util::{firstkd, tempdir, text};

/// The tiny student of the brief: hidden 32, 2 layers, 4 heads, 2 KV heads, vocab 512.
fn tiny_config_json(tied: bool) -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
    })
}

fn write_config(dir: &Path, tied: bool) -> PathBuf {
    let path = dir.join(if tied { "tiny-tied.json" } else { "tiny.json" });
    std::fs::write(&path, tiny_config_json(tied).to_string()).unwrap();
    path
}

/// A small synthetic store with vocabulary 512 (several parts).
/// A random tiny student (tied or untied output) written into `dir`.
fn random_init(dir: &Path, tied: bool, seed: u64) -> Init {
    Init::Random {
        config: write_config(dir, tied),
        seed,
    }
}

fn small_store(dir: &Path) -> PathBuf {
    let path = dir.join("store");
    let cfg = SyntheticConfig {
        label_rows: 4000,
        seed: 11,
        vocab_size: 512,
        min_len: 16,
        max_len: 90,
        part_rows: 1500,
        ..SyntheticConfig::default()
    };
    generate(&path, &cfg, WriterOptions::default()).unwrap();
    path
}

fn opts(loss: LossKind, steps: u64) -> TrainOptions {
    TrainOptions {
        loss,
        temperature: Some(firstkd::Temperature::new(1.5).unwrap()),
        steps,
        batch_tokens: 256,
        lr: 3e-3,
        warmup_steps: 2,
        shuffle_buffer: 16,
        seed: 3,
        ..TrainOptions::default()
    }
}

fn run(
    store: &Path,
    init: &Init,
    out: &Path,
    o: &TrainOptions,
    resume: bool,
) -> firstkd::Result<TrainSummary> {
    train(store, init, out, o, resume, &Device::Cpu, &mut |_| {})
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// A store whose teacher is a bigram model: the top-5 after token `c` are
/// `(31 c + 17 j + 1) mod 512` with probabilities 0.5, 0.2, 0.1, 0.05, 0.05 (tail 0.1), and
/// each next token is drawn from it. Every loss has something to learn here, unlike the
/// synthetic store whose top-k ids are random.
/// Sample `s` of a bigram store: every tenth in `valid`, a 4-token prompt.
fn bigram_record(s: u64, input_ids: Vec<u32>) -> SampleRecord {
    SampleRecord {
        sample_id: s,
        source: "bigram".into(),
        split: if s.is_multiple_of(10) {
            "valid"
        } else {
            "train"
        }
        .into(),
        record_index: s,
        window_index: 0,
        input_ids,
        prompt_len: 4,
    }
}

fn bigram_store(dir: &Path) -> PathBuf {
    use rand::{Rng, SeedableRng};
    let path = dir.join("bigram");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let probs = [0.5f64, 0.2, 0.1, 0.05, 0.05];
    let lps: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
    let tail_lp = (0.1f64 / 507.0).ln() as f32;
    let mut w = StoreWriter::create(&path, tiny_meta(), WriterOptions::default()).unwrap();
    for s in 0..120u64 {
        let mut input_ids = vec![rng.random_range(0..512u32)];
        let mut labels = SampleLabels::default();
        for _ in 0..47 {
            let c = *input_ids.last().unwrap();
            let ids: Vec<u32> = (0..5).map(|j| (31 * c + 17 * j + 1) % 512).collect();
            let u: f64 = rng.random();
            let mut acc = 0.0;
            let mut next = None;
            for (j, p) in probs.iter().enumerate() {
                acc += p;
                if u < acc {
                    next = Some((ids[j], lps[j]));
                    break;
                }
            }
            let (next, next_lp) = next.unwrap_or_else(|| loop {
                let t = rng.random_range(0..512u32);
                if !ids.contains(&t) {
                    break (t, tail_lp);
                }
            });
            labels.topk_ids.extend_from_slice(&ids);
            labels.topk_logprobs.extend_from_slice(&lps);
            labels.target_logprobs.push(next_lp);
            labels.entropy.push(2.0);
            input_ids.push(next);
        }
        w.push(&bigram_record(s, input_ids), &labels).unwrap();
        if s % 40 == 39 {
            w.commit(serde_json::json!({ "done": s + 1 })).unwrap();
        }
    }
    w.finish(serde_json::json!({})).unwrap();
    path
}

#[test]
fn loss_falls_for_every_loss_kind() {
    let tmp = tempdir();
    let store = bigram_store(tmp.path());
    let init = random_init(tmp.path(), true, 1);
    for loss in [
        LossKind::First,
        LossKind::Kd,
        LossKind::KdTail,
        LossKind::Ce,
        LossKind::Mix,
    ] {
        let out = tmp.path().join(format!("run-{loss:?}"));
        let summary = run(&store, &init, &out, &opts(loss, 24), false).unwrap();
        assert_eq!(summary.losses.len(), 24);
        let (first, last) = (mean(&summary.losses[..4]), mean(&summary.losses[20..]));
        assert!(
            last < first * 0.97,
            "{loss:?}: loss {first} -> {last}: {:?}",
            summary.losses
        );
        assert!(out.join("final").join("model.safetensors").exists());
    }
}

#[test]
fn checkpoint_reload_gives_identical_logits() {
    let tmp = tempdir();
    for tied in [true, false] {
        let cfg: StudentConfig = serde_json::from_value(tiny_config_json(tied)).unwrap();
        let student = Student::random(cfg, 9, &Device::Cpu).unwrap();
        let dir = tmp.path().join(format!("model-{tied}"));
        write_model_files(&student, &dir).unwrap();
        // HF names on disk.
        let names =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        assert!(names.contains_key("model.layers.1.self_attn.q_proj.weight"));
        assert_eq!(names.contains_key("lm_head.weight"), !tied);
        let reloaded = load_model(&dir, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[1u32, 2, 3, 400, 5]], &Device::Cpu).unwrap();
        let a = student
            .logits(&ids, &[5])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = reloaded
            .logits(&ids, &[5])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
    }
}

fn weights_of(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut w: Vec<_> = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

#[test]
fn resume_reproduces_an_uninterrupted_run() {
    let tmp = tempdir();
    let store = small_store(tmp.path());
    let init = random_init(tmp.path(), false, 2);
    for (loss, pack) in [
        (LossKind::Kd, false),
        (LossKind::Mix, false),
        (LossKind::Kd, true),
    ] {
        let mut o = opts(loss, 6);
        o.grad_accum = 2;
        o.checkpoint_every = Some(2);
        o.pack = pack;
        if pack {
            o.max_seq_len = Some(64);
        }
        let loss = format!("{loss:?}-pack-{pack}");
        let straight = tmp.path().join(format!("straight-{loss:?}"));
        let full = run(&store, &init, &straight, &o, false).unwrap();

        let split = tmp.path().join(format!("split-{loss:?}"));
        let first = run(
            &store,
            &init,
            &split,
            &TrainOptions {
                stop_after: Some(3),
                ..o.clone()
            },
            false,
        )
        .unwrap();
        assert_eq!(first.steps_done, 3);
        assert!(!split.join("final").exists());
        let second = run(&store, &init, &split, &o, true).unwrap();
        assert_eq!(second.resumed_from, Some(3));
        assert_eq!(second.steps_done, 6);
        assert_eq!(second.losses, full.losses, "{loss}");
        assert_eq!(
            weights_of(&split.join("final")),
            weights_of(&straight.join("final"))
        );
        let lines = std::fs::read_to_string(split.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 6);
    }
}

#[test]
fn packed_and_padded_batches_give_the_same_epoch_loss() {
    use firstkd::store::StoreReader;
    use firstkd::trainer::{batch_loss, BatchStream, DataOptions, KdKind, LossSpec};
    let tmp = tempdir();
    let reader = StoreReader::open(&small_store(tmp.path())).unwrap();
    let student = Student::random(
        serde_json::from_value(tiny_config_json(true)).unwrap(),
        5,
        &Device::Cpu,
    )
    .unwrap();
    for kind in [LossKind::Kd, LossKind::KdTail, LossKind::Ce] {
        let spec = LossSpec {
            kind,
            temperature: firstkd::Temperature::ONE,
            alpha: 0.5,
            mix_kd: KdKind::Kd,
            label_smoothing: 0.0,
            teacher_smoothing: 0.0,
        };
        let epoch = |pack: bool| {
            let data = DataOptions {
                split: "train".into(),
                batch_tokens: 256,
                max_positions: 64,
                shuffle_buffer: 8,
                seed: 4,
                epochs: Some(1),
                pack,
            };
            let (mut sum, mut n, mut batches, mut multi) = (0f64, 0usize, 0usize, false);
            for batch in BatchStream::new(reader.clone(), data).unwrap() {
                let batch = batch.unwrap();
                multi |= batch.segments.iter().any(|s| s.len() > 1);
                let (loss, count) = batch_loss(&student, &batch, &spec, 5, 64, None).unwrap();
                sum += loss.to_scalar::<f32>().unwrap() as f64;
                n += count;
                batches += 1;
            }
            (sum, n, batches, multi)
        };
        let (padded, packed) = (epoch(false), epoch(true));
        assert!(!padded.3 && packed.3, "only the packed stream packs");
        assert_eq!(padded.1, packed.1, "{kind:?}: same in-loss positions");
        assert!(packed.2 < padded.2, "{kind:?}: packing needs fewer batches");
        let rel = (padded.0 - packed.0).abs() / padded.0.abs();
        assert!(
            rel < 1e-5,
            "{kind:?}: epoch loss {} padded vs {} packed",
            padded.0,
            packed.0
        );
    }
}

#[test]
fn resume_refuses_different_settings() {
    let tmp = tempdir();
    let store = small_store(tmp.path());
    let init = random_init(tmp.path(), true, 2);
    let out = tmp.path().join("run");
    run(
        &store,
        &init,
        &out,
        &TrainOptions {
            stop_after: Some(1),
            ..opts(LossKind::Kd, 4)
        },
        false,
    )
    .unwrap();
    let err = run(
        &store,
        &init,
        &out,
        &TrainOptions {
            lr: 1.0,
            ..opts(LossKind::Kd, 4)
        },
        true,
    )
    .unwrap_err();
    assert!(err.to_string().contains("different settings"), "{err}");
}

#[test]
fn refuses_mismatched_vocabulary() {
    let tmp = tempdir();
    let store = small_store(tmp.path());
    let mut cfg = tiny_config_json(true);
    cfg["vocab_size"] = 256.into();
    let path = tmp.path().join("small-vocab.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let init = Init::Random {
        config: path,
        seed: 0,
    };
    let err = run(
        &store,
        &init,
        &tmp.path().join("o"),
        &opts(LossKind::Kd, 2),
        false,
    )
    .unwrap_err();
    assert!(matches!(err, Error::TokenizerMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("512") && err.to_string().contains("256"),
        "{err}"
    );
}

#[test]
fn first_needs_a_temperature() {
    let tmp = tempdir();
    let store = small_store(tmp.path());
    let init = random_init(tmp.path(), true, 0);
    let o = TrainOptions {
        temperature: None,
        ..opts(LossKind::First, 2)
    };
    let err = run(&store, &init, &tmp.path().join("o"), &o, false).unwrap_err();
    assert!(err.to_string().contains("firstkd calibrate"), "{err}");
}

/// A temperature fitted with the uniform-tail renormalisation is not the one `first` applies
/// (a softmax over the stored entries): the trainer refuses it rather than train on it; a
/// manifest from before the mode was a field (mode only in `fitted_on`) is read the same way.
#[test]
fn first_refuses_a_temperature_fitted_in_another_mode() {
    use firstkd::calibration::{FitObjective, TemperatureMode};
    let tmp = tempdir();
    let store = small_store(tmp.path());
    let init = random_init(tmp.path(), true, 0);
    let mut m = firstkd::store::Manifest::load(&store).unwrap();
    let info = firstkd::store::TemperatureInfo {
        value: 1.7,
        objective: FitObjective::Ece,
        mode: Some(TemperatureMode::UniformTail),
        fitted_on: serde_json::json!({}),
        before: serde_json::json!({}),
        after: serde_json::json!({}),
        fitted_by: "test".into(),
    };
    for (mode, fitted_on) in [
        (Some(TemperatureMode::UniformTail), serde_json::json!({})),
        (None, serde_json::json!({"mode": "uniform_tail"})),
    ] {
        m.temperature = Some(firstkd::store::TemperatureInfo {
            mode,
            fitted_on,
            ..info.clone()
        });
        m.save(&store).unwrap();
        let o = TrainOptions {
            temperature: None,
            ..opts(LossKind::First, 1)
        };
        let err = run(&store, &init, &tmp.path().join("o"), &o, false).unwrap_err();
        assert!(
            err.to_string().contains("uniform") && err.to_string().contains("refit"),
            "{err}"
        );
    }
    // Fitted renormalized: trains.
    m.temperature = Some(firstkd::store::TemperatureInfo {
        mode: Some(TemperatureMode::Renormalized),
        ..info
    });
    m.save(&store).unwrap();
    let o = TrainOptions {
        temperature: None,
        ..opts(LossKind::First, 1)
    };
    run(&store, &init, &tmp.path().join("o2"), &o, false).unwrap();
}

#[test]
fn diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let tmp = tempdir();
    let store = small_store(tmp.path());
    let init = random_init(tmp.path(), true, 0);
    let out = tmp.path().join("o");
    let o = TrainOptions {
        lr: 1e36,
        warmup_steps: 0,
        clip_grad_norm: None,
        checkpoint_every: Some(1),
        ..opts(LossKind::Kd, 10)
    };
    let err = run(&store, &init, &out, &o, false).unwrap_err();
    assert!(matches!(err, Error::NonFiniteLoss { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("last good checkpoint"), "{msg}");
    let kept = checkpoint::list_checkpoints(&out).unwrap();
    assert!(!kept.is_empty());
    // The kept checkpoint is loadable and finite.
    let student = load_model(&kept.last().unwrap().1, &Device::Cpu).unwrap();
    let _ = student;
    assert!(!out.join("final").exists());
}

fn tiny_meta() -> firstkd::store::StoreMeta {
    synthetic_meta(&SyntheticConfig {
        vocab_size: 512,
        ..SyntheticConfig::default()
    })
}

#[test]
fn empty_store_and_store_without_loss_positions_are_refused() {
    let tmp = tempdir();
    let init = random_init(tmp.path(), true, 0);
    // No samples at all.
    let empty = tmp.path().join("empty");
    StoreWriter::create(&empty, tiny_meta(), WriterOptions::default())
        .unwrap()
        .finish(serde_json::json!({}))
        .unwrap();
    let err = run(
        &empty,
        &init,
        &tmp.path().join("o1"),
        &opts(LossKind::Kd, 2),
        false,
    )
    .unwrap_err();
    assert!(matches!(err, Error::NoTrainingData(_)), "{err}");
    // Samples that are all prompt.
    let prompt_only = tmp.path().join("prompt-only");
    let mut w = StoreWriter::create(&prompt_only, tiny_meta(), WriterOptions::default()).unwrap();
    for s in 0..3u64 {
        let input_ids: Vec<u32> = (0..10).map(|i| (i * 7 + s as u32) % 512).collect();
        let n = input_ids.len() - 1;
        let mut labels = SampleLabels::default();
        for _ in 0..n {
            labels.topk_ids.extend_from_slice(&[1, 2, 3, 4, 5]);
            labels
                .topk_logprobs
                .extend_from_slice(&[-0.5, -1.5, -2.5, -3.5, -4.5]);
            labels.target_logprobs.push(-6.0);
            labels.entropy.push(1.0);
        }
        let record = SampleRecord {
            sample_id: s,
            source: "t".into(),
            split: "train".into(),
            record_index: s,
            window_index: 0,
            input_ids,
            prompt_len: 10,
        };
        w.push(&record, &labels).unwrap();
    }
    w.finish(serde_json::json!({})).unwrap();
    let err = run(
        &prompt_only,
        &init,
        &tmp.path().join("o2"),
        &opts(LossKind::Kd, 2),
        false,
    )
    .unwrap_err();
    assert!(matches!(err, Error::NoTrainingData(_)), "{err}");
    assert!(err.to_string().contains("in-loss"), "{err}");
}

#[test]
fn cli_distill_trains_validates_and_resumes() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    let s = store.to_str().unwrap();
    let o = firstkd(&[
        "synth", s, "--rows", "30000", "--vocab", "512", "--seed", "4",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let cfg = write_config(tmp.path(), true);
    let init = format!("random:{}", cfg.display());
    let out = tmp.path().join("run");
    let base = [
        "distill",
        "--store",
        s,
        "--init",
        &init,
        "--loss",
        "kd-tail",
        "--steps",
        "4",
        "--batch-tokens",
        "256",
        "--max-seq-len",
        "128",
        "--lr",
        "2e-3",
        "--valid-every",
        "2",
        "--valid-batches",
        "2",
        "--checkpoint-every",
        "2",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    let mut first = base.to_vec();
    first.extend(["--stop-after", "2"]);
    let o = firstkd(&first);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("continue with --resume"), "{}", text(&o));
    let mut again = base.to_vec();
    again.push("--resume");
    let o = firstkd(&again);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("resumed from step 2") && t.contains("trained 4 step(s)"),
        "{t}"
    );
    assert!(t.contains("validation loss"), "{t}");
    assert!(out.join("final").join("config.json").exists());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for key in ["step", "loss", "lr", "grad_norm", "tokens_per_s"] {
        assert!(lines[3].get(key).is_some(), "{key} missing: {}", lines[3]);
    }
    assert!(lines[1].get("valid_loss").is_some());
    // --pack is part of the run's settings: resuming the padded run with it is refused...
    let mut packed = base.to_vec();
    packed.extend(["--pack", "--resume"]);
    let o = firstkd(&packed);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("pack"), "{}", text(&o));
    // ...and a fresh packed run trains.
    let packed_out = tmp.path().join("run-packed");
    let mut packed: Vec<&str> = base[..base.len() - 1].to_vec();
    packed.extend([packed_out.to_str().unwrap(), "--pack"]);
    let o = firstkd(&packed);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("trained 4 step(s)"), "{}", text(&o));
    // Bad input: first without temperature on an uncalibrated store.
    let o = firstkd(&[
        "distill",
        "--store",
        s,
        "--init",
        &init,
        "--steps",
        "1",
        "--quiet",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--temperature"), "{}", text(&o));
}

#[test]
fn a_multi_part_store_streams_across_parts() {
    // Grad accumulation over a store of many small parts with a float32 dtype.
    let tmp = tempdir();
    let path = tmp.path().join("f32");
    let cfg = SyntheticConfig {
        label_rows: 2000,
        seed: 2,
        vocab_size: 512,
        logprob_dtype: LogprobDtype::Float32,
        min_len: 10,
        max_len: 60,
        part_rows: 300,
        ..SyntheticConfig::default()
    };
    let m = generate(&path, &cfg, WriterOptions::default()).unwrap();
    assert!(m.parts.len() >= 5);
    let init = random_init(tmp.path(), false, 0);
    let o = TrainOptions {
        grad_accum: 3,
        epochs: Some(2),
        steps: 1000,
        ..opts(LossKind::Kd, 1000)
    };
    let summary = run(&path, &init, &tmp.path().join("o"), &o, false).unwrap();
    assert!(summary.data_exhausted);
    assert!(summary.steps_done > 5 && summary.steps_done < 1000);
    assert!(tmp.path().join("o").join("final").exists());
}

/// A student initialised from the real teacher GGUF computes the teacher's logits, has
/// (near-)zero kd-tail loss on labels the teacher wrote itself, and `teacher-layers` keeps
/// exactly the chosen blocks.
#[test]
fn student_copy_of_the_real_teacher() {
    use firstkd::store::{StoreMeta, StoreReader, TeacherInfo, TokenizerInfo};
    use firstkd::teacher::{LabelInput, LabelOptions, Teacher};
    use firstkd::trainer::init::{initialise, load_pretrained};
    use firstkd::trainer::{evaluate, KdKind, LossSpec};

    let Some(gguf) = crate::util::teacher_path() else {
        return;
    };
    let tmp = tempdir();
    let teacher = Teacher::load(&gguf, &Device::Cpu).unwrap();
    let made = initialise(&Init::Gguf(gguf.clone()), &Device::Cpu).unwrap();
    let student = made.student;
    assert_eq!(
        made.tokenizer_sha256.as_deref(),
        Some(teacher.tokenizer().identity().sha256.as_str())
    );
    assert_eq!(student.config().vocab_size, 49152);
    assert!(student.config().tie_word_embeddings);

    // Same logits as the inference teacher.
    let texts = [
        "The capital of France is Paris. It is known for",
        "1, 2, 3, 4, 5, 6,",
    ];
    let seqs: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| teacher.tokenizer().encode(t, true).unwrap())
        .collect();
    let ids = Tensor::new(seqs[0].as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let t = teacher.model().forward_logits(&ids).unwrap();
    let s = student.logits(&ids, &[seqs[0].len()]).unwrap();
    let diff = firstkd::testing::max_abs_diff(&t, &s).unwrap();
    assert!(diff < 2e-3, "student vs teacher logits differ by {diff}");

    // A float32 store labelled by the teacher; the copy's kd-tail and kd losses are ~0.
    let tok = teacher.tokenizer().identity();
    let meta = StoreMeta {
        k: 5,
        selection: firstkd::schema::Selection::TopK { k: 5 },
        logprob_dtype: LogprobDtype::Float32,
        teacher: TeacherInfo {
            file_name: "teacher".into(),
            ..TeacherInfo::default()
        },
        tokenizer: TokenizerInfo {
            sha256: tok.sha256.clone(),
            vocab_size: tok.vocab_size,
            special_tokens: Default::default(),
        },
        labeling: serde_json::json!({"kind": "test"}),
    };
    let store = tmp.path().join("teacher-store");
    let mut w = StoreWriter::create(&store, meta, WriterOptions::default()).unwrap();
    let inputs: Vec<LabelInput> = seqs
        .iter()
        .map(|s| LabelInput {
            input_ids: s,
            prompt_len: 2,
        })
        .collect();
    let labels = teacher
        .label_batch(&inputs, &LabelOptions::default())
        .unwrap();
    for (i, (seq, l)) in seqs.iter().zip(labels).enumerate() {
        let record = SampleRecord {
            sample_id: i as u64,
            source: "t".into(),
            split: "train".into(),
            record_index: i as u64,
            window_index: 0,
            input_ids: seq.clone(),
            prompt_len: 2,
        };
        let sl = SampleLabels {
            topk_ids: l.topk_ids,
            topk_logprobs: l.topk_logprobs,
            target_logprobs: l.target_logprobs,
            entropy: l.entropy,
            ..SampleLabels::default()
        };
        w.push(&record, &sl).unwrap();
    }
    w.finish(serde_json::json!({})).unwrap();
    let reader = StoreReader::open(&store).unwrap();
    for kind in [LossKind::KdTail, LossKind::Kd] {
        let spec = LossSpec {
            kind,
            temperature: firstkd::Temperature::ONE,
            alpha: 1.0,
            mix_kd: KdKind::Kd,
            label_smoothing: 0.0,
            teacher_smoothing: 0.0,
        };
        let loss = evaluate(&student, &reader, "train", &spec, 512, 512, 0, 64, None)
            .unwrap()
            .unwrap();
        assert!(loss.abs() < 1e-4, "{kind:?} of the teacher's copy: {loss}");
    }
    // Training starts from that point: the tokenizer hash matches, one step runs.
    let o = TrainOptions {
        loss: LossKind::KdTail,
        steps: 1,
        batch_tokens: 64,
        lr: 1e-5,
        ..TrainOptions::default()
    };
    let summary = run(
        &store,
        &Init::Gguf(gguf.clone()),
        &tmp.path().join("run"),
        &o,
        false,
    )
    .unwrap();
    assert!(summary.losses[0] < 1e-3, "{:?}", summary.losses);

    // teacher-layers keeps blocks 0 and 29 (renumbered 0, 1) and everything outside blocks.
    let (full_cfg, full, _) = load_pretrained(&gguf, None).unwrap();
    let (cfg, part, _) = load_pretrained(&gguf, Some(&[0, 29])).unwrap();
    assert_eq!((full_cfg.num_hidden_layers, cfg.num_hidden_layers), (30, 2));
    let same = |a: &str, b: &str| {
        let x = full[a].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = part[b].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(x, y, "{a} vs {b}");
    };
    same(
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
    );
    same(
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    );
    same("model.embed_tokens.weight", "model.embed_tokens.weight");
    assert!(!part.contains_key("model.layers.2.input_layernorm.weight"));
    let small = Student::from_weights(cfg, part, &Device::Cpu).unwrap();
    assert_eq!(small.vars().len(), 2 * 9 + 2);
    // A synthetic store's tokenizer hash differs from the teacher's: refused unless told.
    let synth = small_store(tmp.path());
    let mut m = firstkd::store::Manifest::load(&synth).unwrap();
    m.tokenizer.vocab_size = 49152;
    m.save(&synth).unwrap();
    let init = Init::TeacherLayers {
        path: gguf.clone(),
        layers: vec![0, 29],
    };
    let err = run(
        &synth,
        &init,
        &tmp.path().join("r2"),
        &opts(LossKind::Kd, 1),
        false,
    )
    .unwrap_err();
    assert!(matches!(err, Error::TokenizerMismatch { .. }), "{err}");
}

/// Mixed precision (bf16 matrix products on f32 master weights) on the CPU: the loss stays
/// close to the f32 run's and still falls; weights and optimizer state stay f32.
#[test]
fn bf16_compute_tracks_f32_and_learns() {
    let tmp = tempdir();
    let store = bigram_store(tmp.path());
    let init = random_init(tmp.path(), true, 1);
    let f32_run = run(
        &store,
        &init,
        &tmp.path().join("f32"),
        &opts(LossKind::Kd, 24),
        false,
    )
    .unwrap();
    let o = TrainOptions {
        precision: firstkd::trainer::Precision::Bf16,
        ..opts(LossKind::Kd, 24)
    };
    let bf16_run = run(&store, &init, &tmp.path().join("bf16"), &o, false).unwrap();
    // Same data and init: the first loss differs only by bf16 rounding of the products.
    let rel = (bf16_run.losses[0] - f32_run.losses[0]).abs() / f32_run.losses[0];
    assert!(
        rel < 0.02,
        "first loss f32 {} bf16 {}",
        f32_run.losses[0],
        bf16_run.losses[0]
    );
    let (first, last) = (mean(&bf16_run.losses[..4]), mean(&bf16_run.losses[20..]));
    assert!(last < first * 0.97, "bf16 loss {first} -> {last}");
    let model = load_model(&tmp.path().join("bf16").join("final"), &Device::Cpu).unwrap();
    for (name, var) in model.vars() {
        assert_eq!(var.dtype(), candle_core::DType::F32, "{name}");
    }
    // A different compute type is a different run (resuming across it is refused).
    assert_ne!(o.fingerprint(), opts(LossKind::Kd, 24).fingerprint());
}

/// GPU checks, built only with `--features cuda` and run on a machine with a GPU
/// (`scripts/cuda-check.sh`): the CUDA trainer reproduces the CPU one.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    fn gpu() -> Device {
        Device::new_cuda(0).expect("a CUDA device (these tests need a GPU)")
    }

    fn max_rel(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / x.abs().max(1e-6))
            .fold(0.0, f64::max)
    }

    #[test]
    fn cuda_student_logits_and_gradients_match_cpu() {
        let cfg: StudentConfig = serde_json::from_value(tiny_config_json(false)).unwrap();
        let ids = [[1u32, 5, 9, 300, 7, 2], [2, 8, 4, 0, 0, 0]];
        let mut outs = Vec::new();
        for dev in [Device::Cpu, gpu()] {
            let student = Student::random(cfg.clone(), 3, &dev).unwrap();
            let t = Tensor::new(&ids, &dev).unwrap();
            let logits = student.logits(&t, &[6, 3]).unwrap();
            let lsm = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
            let loss = lsm.mean_all().unwrap().neg().unwrap();
            let grads = loss.backward().unwrap();
            let flat = |t: &Tensor| -> Vec<f32> {
                t.to_device(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let g: Vec<(String, Vec<f32>)> = student
                .vars()
                .iter()
                .map(|(n, v)| (n.clone(), flat(grads.get(v.as_tensor()).unwrap())))
                .collect();
            outs.push((flat(&logits), g));
        }
        let (cpu, gpu) = (&outs[0], &outs[1]);
        let d = firstkd::testing::max_abs_diff_slices(&cpu.0, &gpu.0);
        assert!(d < 1e-4, "logits differ by {d}");
        for ((name, a), (_, b)) in cpu.1.iter().zip(&gpu.1) {
            let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1e-8);
            let d = firstkd::testing::max_abs_diff_slices(a, b);
            assert!(
                d / scale < 1e-3,
                "{name}: gradient differs by {d} (scale {scale})"
            );
            assert!(
                b.iter().any(|x| *x != 0.0),
                "{name}: zero gradient on the GPU"
            );
        }
    }

    #[test]
    fn cuda_training_matches_cpu_for_every_loss() {
        let tmp = tempdir();
        let store = bigram_store(tmp.path());
        let init = random_init(tmp.path(), false, 1);
        for loss in [
            LossKind::First,
            LossKind::Kd,
            LossKind::KdTail,
            LossKind::Ce,
        ] {
            let o = opts(loss, 12);
            let cpu = run(
                &store,
                &init,
                &tmp.path().join(format!("cpu-{loss:?}")),
                &o,
                false,
            )
            .unwrap();
            let out = tmp.path().join(format!("gpu-{loss:?}"));
            let gpu = train(&store, &init, &out, &o, false, &gpu(), &mut |_| {}).unwrap();
            let rel = max_rel(&cpu.losses, &gpu.losses);
            assert!(
                rel < 2e-3,
                "{loss:?}: cpu {:?} gpu {:?}",
                cpu.losses,
                gpu.losses
            );
            // The GPU checkpoint loads on the CPU.
            load_model(&out.join("final"), &Device::Cpu).unwrap();
        }
        // bf16 products on the GPU: close to f32 at the start, and learning.
        let o = TrainOptions {
            precision: firstkd::trainer::Precision::Bf16,
            ..opts(LossKind::Kd, 24)
        };
        let f32_run = run(
            &store,
            &init,
            &tmp.path().join("cpu-24"),
            &opts(LossKind::Kd, 24),
            false,
        )
        .unwrap();
        let bf16 = train(
            &store,
            &init,
            &tmp.path().join("gpu-bf16"),
            &o,
            false,
            &gpu(),
            &mut |_| {},
        )
        .unwrap();
        let rel = (bf16.losses[0] - f32_run.losses[0]).abs() / f32_run.losses[0];
        assert!(
            rel < 0.02,
            "first loss f32 {} bf16 {}",
            f32_run.losses[0],
            bf16.losses[0]
        );
        assert!(
            mean(&bf16.losses[20..]) < mean(&bf16.losses[..4]) * 0.97,
            "{:?}",
            bf16.losses
        );
    }

    #[test]
    fn cuda_cli_distill_runs() {
        let tmp = tempdir();
        let store = bigram_store(tmp.path());
        let cfg = write_config(tmp.path(), true);
        let out = tmp.path().join("cli");
        let o = firstkd(&[
            "distill",
            "--store",
            store.to_str().unwrap(),
            "--init",
            &format!("random:{}", cfg.display()),
            "--loss",
            "kd",
            "--steps",
            "6",
            "--batch-tokens",
            "256",
            "--device",
            "cuda",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(out.join("final").join("model.safetensors").exists());
    }
}

/// The library's error names no flag; the CLI adds the one that fixes it.
#[test]
fn missing_temperature_names_the_flag_that_gives_one() {
    let tmp = tempdir();
    let store = small_store(tmp.path());
    let manifest = firstkd::store::Manifest::load(&store).unwrap();
    assert!(
        manifest.temperature.is_none(),
        "the test store has no fitted T"
    );
    let out = firstkd(&[
        "distill",
        "--store",
        store.to_str().unwrap(),
        "--init",
        "random:missing.json",
        "--loss",
        "first",
        "--steps",
        "1",
        "--quiet",
        "--out",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("needs a teacher temperature") && t.contains("pass --temperature T"),
        "{t}"
    );
    assert!(!t.contains("panicked"), "{t}");
    // Library callers get the message without any flag in it.
    let opts = TrainOptions {
        loss: LossKind::First,
        steps: 1,
        ..TrainOptions::default()
    };
    let init = Init::parse("random:missing.json", 0).unwrap();
    let err = train(
        &store,
        &init,
        &tmp.path().join("o2"),
        &opts,
        false,
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(!err.to_string().contains("--"), "{err}");
}

/// The bigram store's teacher as a top-p (p = 0.85: the first 4 of its 5 ids) or a sampled
/// (8 draws, ids with counts) store.
fn selected_bigram_store(dir: &Path, selection: firstkd::schema::Selection) -> PathBuf {
    use rand::{Rng, SeedableRng};
    let path = dir.join(format!(
        "bigram-{}",
        selection.to_string().replace([':', ',', '='], "-")
    ));
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let probs = [0.5f64, 0.2, 0.1, 0.05, 0.05];
    let tail_lp = (0.1f64 / 507.0).ln() as f32;
    let mut meta = tiny_meta();
    meta.selection = selection;
    meta.k = selection.max_len();
    meta.logprob_dtype = LogprobDtype::Quantized;
    let mut w = StoreWriter::create(&path, meta, WriterOptions::default()).unwrap();
    let draw = |rng: &mut rand::rngs::StdRng, ids: &[u32]| -> (u32, f32) {
        let u: f64 = rng.random();
        let mut acc = 0.0;
        for (j, p) in probs.iter().enumerate() {
            acc += p;
            if u < acc {
                return (ids[j], p.ln() as f32);
            }
        }
        loop {
            let t = rng.random_range(0..512u32);
            if !ids.contains(&t) {
                return (t, tail_lp);
            }
        }
    };
    for s in 0..120u64 {
        let mut input_ids = vec![rng.random_range(0..512u32)];
        let mut labels = SampleLabels::default();
        for _ in 0..47 {
            let c = *input_ids.last().unwrap();
            let ids: Vec<u32> = (0..5).map(|j| (31 * c + 17 * j + 1) % 512).collect();
            match selection {
                firstkd::schema::Selection::Sample { draws, .. } => {
                    let mut got: Vec<(u32, f32, u16)> = Vec::new();
                    for _ in 0..draws {
                        let (id, lp) = draw(&mut rng, &ids);
                        match got.iter_mut().find(|g| g.0 == id) {
                            Some(g) => g.2 += 1,
                            None => got.push((id, lp, 1)),
                        }
                    }
                    got.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                    labels.lengths.push(got.len() as u32);
                    for (id, lp, c) in got {
                        labels.topk_ids.push(id);
                        labels.topk_logprobs.push(lp);
                        labels.counts.push(c);
                    }
                }
                _ => {
                    labels.lengths.push(4);
                    labels.topk_ids.extend_from_slice(&ids[..4]);
                    labels
                        .topk_logprobs
                        .extend(probs[..4].iter().map(|p| p.ln() as f32));
                }
            }
            let (next, next_lp) = draw(&mut rng, &ids);
            let lp = match ids.iter().position(|&i| i == next) {
                Some(j) if j < 4 => probs[j].ln() as f32,
                _ => next_lp,
            };
            labels.target_logprobs.push(lp);
            labels.entropy.push(2.0);
            input_ids.push(next);
        }
        w.push(&bigram_record(s, input_ids), &labels).unwrap();
    }
    w.finish(serde_json::json!({})).unwrap();
    path
}

#[test]
fn loss_falls_on_top_p_and_sampled_stores() {
    use firstkd::schema::Selection;
    let tmp = tempdir();
    let init = random_init(tmp.path(), true, 1);
    let top_p = selected_bigram_store(tmp.path(), Selection::TopP { p: 0.85, max: 5 });
    let sampled = selected_bigram_store(
        tmp.path(),
        Selection::Sample {
            draws: 8,
            temperature: 1.0,
            seed: 0,
        },
    );
    for (store, loss) in [
        (&top_p, LossKind::First),
        (&top_p, LossKind::Kd),
        (&top_p, LossKind::KdTail),
        (&top_p, LossKind::Mix),
        (&sampled, LossKind::Sampled),
    ] {
        let out = tmp.path().join(format!(
            "run-{loss:?}-{}",
            store.file_name().unwrap().to_string_lossy()
        ));
        let summary = run(store, &init, &out, &opts(loss, 24), false).unwrap();
        assert!(
            summary.losses.iter().all(|l| l.is_finite()),
            "{loss:?}: {:?}",
            summary.losses
        );
        let (first, last) = (mean(&summary.losses[..4]), mean(&summary.losses[20..]));
        assert!(
            last < first * 0.97,
            "{loss:?}: loss {first} -> {last}: {:?}",
            summary.losses
        );
    }
    // Draws are not top tokens, and a top-k store has no draws.
    let refused = |store: &Path, loss: LossKind| -> String {
        let out = tmp.path().join(format!("refused-{loss:?}"));
        run(store, &init, &out, &opts(loss, 2), false)
            .unwrap_err()
            .to_string()
    };
    let err = refused(&sampled, LossKind::Kd);
    assert!(
        err.contains("the sampled loss") && !err.contains("--"),
        "{err}"
    );
    let err = refused(&bigram_store(tmp.path()), LossKind::Sampled);
    assert!(err.contains("sample:N"), "{err}");
}
