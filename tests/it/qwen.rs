//! The real teacher/student pair: Qwen2.5-Coder-1.5B-Instruct labels, Qwen2.5-Coder-0.5B-Instruct
//! is distilled from its GGUF, and both are evaluated, through the CLI. The models come from
//! `scripts/fetch-model.sh qwen2.5-coder-1.5b` / `qwen2.5-coder-0.5b`; the independent values
//! from `../shared/reference/qwen25_coder_reference.json` (transformers + torch fp32 on the same
//! GGUF files). Missing models or data: a failure under CI=true, a printed skip elsewhere.
//!
//! One test runs the whole chain so that at most one of the models is in memory at a time
//! (the 1.5B teacher in f32 is about 7 GB, the 0.5B student with AdamW state about 10 GB).

use std::path::Path;

use candle_core::Device;
use firstkd::teacher::{LabelInput, LabelOptions, Teacher};
use firstkd::testing::{require_model, require_shared, require_torch_python};

use crate::util::{firstkd, tempdir, text};

/// Reads the JSON header of a safetensors file: tensor name -> (dtype, shape).
fn safetensors_header(path: &Path) -> Vec<(String, String, Vec<u64>)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).unwrap();
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    f.read_exact(&mut header).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&header).unwrap();
    let mut out: Vec<_> = v
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .map(|(k, t)| {
            let shape = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            (k.clone(), t["dtype"].as_str().unwrap().to_string(), shape)
        })
        .collect();
    out.sort();
    out
}

/// The tensor names and shapes transformers' `Qwen2ForCausalLM` loads for Qwen2.5-0.5B. The
/// GGUF stores the output matrix apart from the embedding (Q8_0 vs Q5_0), so the checkpoint
/// keeps both: `lm_head.weight` and `tie_word_embeddings: false`.
fn expected_qwen2_tensors() -> Vec<(String, Vec<u64>)> {
    let (h, inter, kv, vocab) = (896u64, 4864u64, 128u64, 151_936u64);
    let mut v = vec![
        ("lm_head.weight".to_string(), vec![vocab, h]),
        ("model.embed_tokens.weight".to_string(), vec![vocab, h]),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    for i in 0..24 {
        let p = format!("model.layers.{i}");
        for (n, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.q_proj.bias", vec![h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![inter, h]),
            ("mlp.up_proj.weight", vec![inter, h]),
            ("mlp.down_proj.weight", vec![h, inter]),
        ] {
            v.push((format!("{p}.{n}"), shape));
        }
    }
    v.sort();
    v
}

fn csv_rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .filter(|l| l.contains(',') && !l.starts_with('('))
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[test]
fn qwen_pair_label_distill_checkpoint_and_compare() {
    let Some(teacher) = require_model("qwen2.5-coder-1.5b") else {
        return;
    };
    let Some(student) = require_model("qwen2.5-coder-0.5b") else {
        return;
    };
    let Some(csqa) = require_shared("data/commonsenseqa/train_rand_split.jsonl") else {
        return;
    };
    let Some(arc) = require_shared("data/arc_easy/test.json") else {
        return;
    };
    let Some(reference) = require_shared("reference/qwen25_coder_reference.json") else {
        return;
    };
    let dir = tempdir();
    let store = dir.path().join("store");
    let (teacher_s, student_s, store_s) = (
        teacher.to_str().unwrap(),
        student.to_str().unwrap(),
        store.to_str().unwrap(),
    );

    // 1. The 1.5B teacher labels real multiple-choice questions (answer text as response).
    let out = firstkd(&[
        "label",
        "--model",
        teacher_s,
        "--input",
        csqa.to_str().unwrap(),
        "--format",
        "mc",
        "--mc-response",
        "text",
        "--limit",
        "12",
        "--out",
        store_s,
    ]);
    assert!(out.status.success(), "label: {}", text(&out));
    let out = firstkd(&["verify", store_s]);
    assert!(out.status.success(), "verify: {}", text(&out));
    let out = firstkd(&["inspect", store_s, "--json"]);
    assert!(out.status.success(), "inspect: {}", text(&out));
    let inspect: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = inspect.to_string();
    assert!(s.contains("qwen2.5-coder-1.5b-instruct.gguf"), "{s}");
    assert!(s.contains("cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"));

    // 2. The 0.5B student from its GGUF: lr 0 writes the initial weights as a checkpoint.
    let run = dir.path().join("run");
    let out = firstkd(&[
        "distill",
        "--store",
        store_s,
        "--init",
        &format!("gguf:{student_s}"),
        "--loss",
        "kd",
        "--steps",
        "1",
        "--batch-tokens",
        "128",
        "--lr",
        "0",
        "--quiet",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "distill: {}", text(&out));
    let log = text(&out);
    assert!(log.contains("peak resident memory"), "{log}");
    let fin = run.join("final");

    // 3. The checkpoint is what transformers' Qwen2ForCausalLM reads.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fin.join("config.json")).unwrap()).unwrap();
    for (key, want) in [
        ("architectures", serde_json::json!(["Qwen2ForCausalLM"])),
        ("model_type", serde_json::json!("qwen2")),
        ("hidden_size", serde_json::json!(896)),
        ("intermediate_size", serde_json::json!(4864)),
        ("num_hidden_layers", serde_json::json!(24)),
        ("num_attention_heads", serde_json::json!(14)),
        ("num_key_value_heads", serde_json::json!(2)),
        ("vocab_size", serde_json::json!(151_936)),
        ("hidden_act", serde_json::json!("silu")),
        ("tie_word_embeddings", serde_json::json!(false)),
    ] {
        assert_eq!(cfg[key], want, "config.json {key}: {cfg}");
    }
    assert_eq!(cfg["rope_theta"].as_f64(), Some(1_000_000.0), "{cfg}");
    assert_eq!(cfg["rms_norm_eps"].as_f64(), Some(1e-6), "{cfg}");
    assert!(cfg["max_position_embeddings"].as_u64().unwrap() >= 32_768);
    let header = safetensors_header(&fin.join("model.safetensors"));
    let got: Vec<(String, Vec<u64>)> = header
        .iter()
        .map(|(n, _, s)| (n.clone(), s.clone()))
        .collect();
    assert_eq!(got, expected_qwen2_tensors());
    assert!(header.iter().all(|(_, d, _)| d == "F32"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(fin.join("model.safetensors"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o044,
            0o044,
            "checkpoint weights readable by others: {mode:o}"
        );
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert!(fin.join(f).is_file(), "{f} missing from the checkpoint");
    }
    let tok_cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fin.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tok_cfg["chat_template"]
        .as_str()
        .is_some_and(|t| t.contains("<|im_start|>")));

    // 4. Loaded back, the checkpoint gives the reference top-5 at every position.
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&reference).unwrap()).unwrap();
    let model = Teacher::load(&fin, &Device::Cpu).unwrap();
    let mut worst = 0f32;
    for s in r["models"]["student"]["sequences"].as_array().unwrap() {
        let ids: Vec<u32> = s["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            model
                .tokenizer()
                .encode(s["text"].as_str().unwrap(), true)
                .unwrap(),
            ids
        );
        let labels = model
            .label_batch(
                &[LabelInput {
                    input_ids: &ids,
                    prompt_len: 0,
                }],
                &LabelOptions::default(),
            )
            .unwrap();
        for (p, (rid, rlp)) in s["topk_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(s["topk_logprobs"].as_array().unwrap())
            .take(ids.len() - 1)
            .enumerate()
        {
            for j in 0..5 {
                let (want_id, want_lp) = (
                    rid[j].as_u64().unwrap() as u32,
                    rlp[j].as_f64().unwrap() as f32,
                );
                let (id, lp) = (
                    labels[0].topk_ids[p * 5 + j],
                    labels[0].topk_logprobs[p * 5 + j],
                );
                assert!(
                    id == want_id || (lp - want_lp).abs() < 1e-4,
                    "position {p} rank {j}: {id} vs reference {want_id}"
                );
                worst = worst.max((lp - want_lp).abs());
            }
        }
    }
    eprintln!("0.5B checkpoint vs transformers fp32: max top-5 log-prob difference {worst:.2e}");
    assert!(worst < 2e-3, "{worst}");
    drop(model);

    // 4b. transformers itself loads the checkpoint as Qwen2ForCausalLM (strict: no missing,
    // unexpected or mis-shaped tensor) and gives the reference top-5 at every position.
    if let Some(python) = require_torch_python() {
        let out = std::process::Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/hf_load_check.py"
            ))
            .arg(&fin)
            .arg(reference)
            .args(["student", "Qwen2ForCausalLM"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "transformers on {}: {}",
            fin.display(),
            text(&out)
        );
        eprintln!(
            "transformers load: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }

    // 5. compare: both models through cloze scoring (prompt once per question).
    let out = firstkd(&[
        "compare",
        "--model",
        &format!("teacher={teacher_s}"),
        "--model",
        &format!("student={}", fin.display()),
        "--task",
        &format!("arc={}", arc.display()),
        "--mode",
        "cloze",
        "--limit",
        "20",
        "--csv",
    ]);
    assert!(out.status.success(), "compare: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let rows = csv_rows(&stdout);
    assert_eq!(rows.len(), 3, "{stdout}");
    let acc = |row: &Vec<String>| row[1].parse::<f64>().unwrap();
    eprintln!(
        "ARC-Easy (20 items, cloze): teacher {}, student {}",
        acc(&rows[1]),
        acc(&rows[2])
    );
    // Chance is about 0.25; the 1.5B scores 0.65 on the first 40 items (issue measurement).
    assert!(acc(&rows[1]) >= 0.45, "{stdout}");
    assert!(acc(&rows[2]) >= 0.35, "{stdout}");
}
