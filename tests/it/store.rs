//! Write / read round trips, property tests and resume of the store.

use arrow::array::AsArray;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float32Type, UInt32Type, UInt64Type};
use firstkd::schema::{LogprobDtype, Table};
use firstkd::store::manifest::TokenizerInfo;
use firstkd::store::writer::Opened;
use firstkd::store::{
    verify, LabelColumn, SampleLabels, SampleRecord, StoreMeta, StoreReader, StoreWriter,
    TeacherInfo, WriterOptions,
};
use firstkd::Error;
use proptest::prelude::*;

use crate::util::tempdir;

fn meta(k: usize, dtype: LogprobDtype, vocab: u32) -> StoreMeta {
    StoreMeta {
        k,
        selection: firstkd::schema::Selection::TopK { k },
        logprob_dtype: dtype,
        teacher: TeacherInfo {
            file_name: "test.gguf".into(),
            sha256: "00".into(),
            architecture: "llama".into(),
            quantization: "Q4_1".into(),
            compute_dtype: "f32".into(),
            compute_mode: "test".into(),
        },
        tokenizer: TokenizerInfo {
            sha256: "11".into(),
            vocab_size: vocab,
            special_tokens: Default::default(),
        },
        labeling: serde_json::json!({"test": true}),
    }
}

/// One row as read back: (sample, position, target, in_loss, ids, lps, target_lp, entropy).
type Row = (u64, u32, u32, bool, Vec<u32>, Vec<f32>, f32, f32);

fn read_labels(reader: &StoreReader) -> Vec<Row> {
    let k = reader.manifest().k;
    let mut rows = Vec::new();
    for batch in reader.batches(Table::Labels, None, 333).expect("batches") {
        let batch = batch.expect("batch");
        let sid = batch.column(0).as_primitive::<UInt64Type>();
        let pos = batch.column(1).as_primitive::<UInt32Type>();
        let tgt = batch.column(2).as_primitive::<UInt32Type>();
        let loss = batch.column(3).as_boolean();
        let ids = batch.column(4).as_fixed_size_list();
        let ids = ids.values().as_primitive::<UInt32Type>();
        let lps = cast(
            batch.column(5).as_fixed_size_list().values(),
            &DataType::Float32,
        )
        .unwrap();
        let lps = lps.as_primitive::<Float32Type>();
        let tlp = cast(batch.column(6), &DataType::Float32).unwrap();
        let tlp = tlp.as_primitive::<Float32Type>();
        let ent = batch.column(7).as_primitive::<Float32Type>();
        for i in 0..batch.num_rows() {
            rows.push((
                sid.value(i),
                pos.value(i),
                tgt.value(i),
                loss.value(i),
                ids.values()[i * k..(i + 1) * k].to_vec(),
                lps.values()[i * k..(i + 1) * k].to_vec(),
                tlp.value(i),
                ent.value(i),
            ));
        }
    }
    rows
}

/// The same rows through the typed read side (`StoreReader::label_rows`).
fn typed_labels(reader: &StoreReader, batch_rows: usize) -> Vec<Row> {
    let mut out = Vec::new();
    for rows in reader.label_rows(&LabelColumn::ALL, batch_rows) {
        let rows = rows.expect("typed rows");
        for i in 0..rows.len() {
            out.push((
                rows.sample_id[i],
                rows.position[i],
                rows.target_id[i],
                rows.in_loss[i],
                rows.ids(i).to_vec(),
                rows.logprobs(i).to_vec(),
                rows.target_logprob[i],
                rows.entropy[i],
            ));
        }
    }
    out
}

/// Expected rows for samples written with `push`, after the writer's canonical ordering.
fn expected_rows(
    samples: &[(SampleRecord, SampleLabels)],
    k: usize,
    dtype: LogprobDtype,
) -> Vec<Row> {
    let round = |x: f32| match dtype {
        LogprobDtype::Float16 => half::f16::from_f32(x).to_f32(),
        LogprobDtype::Float32 => x,
        LogprobDtype::Quantized => panic!("these rows are checked in the 1.0 layouts"),
    };
    let mut rows = Vec::new();
    for (s, l) in samples {
        for p in 0..s.input_ids.len() - 1 {
            let mut pairs: Vec<(f32, u32)> = (0..k)
                .map(|j| (round(l.topk_logprobs[p * k + j]), l.topk_ids[p * k + j]))
                .collect();
            pairs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            rows.push((
                s.sample_id,
                p as u32,
                s.input_ids[p + 1],
                p as u32 + 1 >= s.prompt_len,
                pairs.iter().map(|x| x.1).collect(),
                pairs.iter().map(|x| x.0).collect(),
                round(l.target_logprobs[p]),
                l.entropy[p],
            ));
        }
    }
    rows
}

fn sample_strategy(k: usize, vocab: u32) -> impl Strategy<Value = (SampleRecord, SampleLabels)> {
    (2usize..30).prop_flat_map(move |len| {
        let n = len - 1;
        (
            prop::collection::vec(0..vocab, len),
            0..=len as u32,
            prop::collection::vec(
                prop::sample::subsequence((0..vocab).collect::<Vec<_>>(), k),
                n,
            ),
            prop::collection::vec(prop::collection::vec(-20.0f32..0.0, k), n),
            prop::collection::vec(0.0f32..10.0, n),
        )
            .prop_map(move |(input_ids, prompt_len, ids, raw, entropy)| {
                let mut topk_ids = Vec::new();
                let mut topk_logprobs = Vec::new();
                let mut target_logprobs = Vec::new();
                for (row_ids, row_raw) in ids.iter().zip(&raw) {
                    // Make the row a valid distribution fragment: sorted, total mass <= 1.
                    let mut lps: Vec<f32> = row_raw.iter().map(|x| x - (k as f32).ln()).collect();
                    lps.sort_by(|a, b| b.total_cmp(a));
                    topk_ids.extend_from_slice(row_ids);
                    topk_logprobs.extend_from_slice(&lps);
                    target_logprobs.push(lps[k - 1] - 1.0);
                }
                // Targets must be outside the top-k for the fabricated target log-prob to be valid.
                let mut input_ids = input_ids;
                for p in 0..n {
                    let row = &topk_ids[p * k..(p + 1) * k];
                    let mut t = input_ids[p + 1];
                    while row.contains(&t) {
                        t = (t + 1) % vocab;
                    }
                    input_ids[p + 1] = t;
                }
                (
                    SampleRecord {
                        sample_id: 0,
                        source: "prop".into(),
                        split: "train".into(),
                        record_index: 0,
                        window_index: 0,
                        input_ids,
                        prompt_len,
                    },
                    SampleLabels {
                        topk_ids,
                        topk_logprobs,
                        target_logprobs,
                        entropy,
                        ..SampleLabels::default()
                    },
                )
            })
    })
}

fn write_all(
    dir: &std::path::Path,
    samples: &mut [(SampleRecord, SampleLabels)],
    k: usize,
    dtype: LogprobDtype,
    vocab: u32,
    commit_every: usize,
) -> firstkd::store::Manifest {
    let opts = WriterOptions {
        batch_rows: 50,
        row_group_rows: 64,
        ..WriterOptions::default()
    };
    let mut w = StoreWriter::create(dir, meta(k, dtype, vocab), opts).unwrap();
    for (i, (s, l)) in samples.iter_mut().enumerate() {
        s.sample_id = i as u64;
        s.record_index = i as u64;
        w.push(s, l).unwrap();
        if (i + 1) % commit_every == 0 {
            w.commit(serde_json::json!({ "next": i + 1 })).unwrap();
        }
    }
    w.finish(serde_json::json!({ "next": samples.len() }))
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn roundtrip_and_invariants(
        k in 1usize..7,
        f16 in any::<bool>(),
        commit_every in 1usize..6,
        seed_samples in prop::collection::vec(sample_strategy(6, 300), 1..12),
    ) {
        let dtype = if f16 { LogprobDtype::Float16 } else { LogprobDtype::Float32 };
        // Cut the generated k=6 rows down to k columns (still sorted, still valid).
        let mut samples: Vec<_> = seed_samples.into_iter().map(|(s, l)| {
            let n = s.input_ids.len() - 1;
            let mut ids = Vec::new();
            let mut lps = Vec::new();
            for p in 0..n {
                ids.extend_from_slice(&l.topk_ids[p * 6..p * 6 + k]);
                lps.extend_from_slice(&l.topk_logprobs[p * 6..p * 6 + k]);
            }
            (s, SampleLabels { topk_ids: ids, topk_logprobs: lps, ..l })
        }).collect();
        let tmp = tempdir();
        let dir = tmp.path().join("store");
        let manifest = write_all(&dir, &mut samples, k, dtype, 300, commit_every);
        let expected = expected_rows(&samples, k, dtype);
        prop_assert_eq!(manifest.rows(Table::Labels), expected.len() as u64);
        prop_assert_eq!(manifest.rows(Table::Samples), samples.len() as u64);
        let reader = StoreReader::open(&dir).unwrap();
        prop_assert_eq!(read_labels(&reader), expected.clone());
        // The typed read side gives the same rows, whatever the batch size.
        prop_assert_eq!(typed_labels(&reader, 97), expected);
        // And the join gives each sample its own rows, in order.
        let joined: Vec<_> = reader
            .labelled_samples(&LabelColumn::ALL, |_| true)
            .collect::<Result<_, _>>()
            .unwrap();
        prop_assert_eq!(joined.len(), samples.len());
        for j in &joined {
            let s = samples.iter().find(|(s, _)| s.sample_id == j.sample.sample_id).unwrap();
            prop_assert_eq!(&j.sample.input_ids, &s.0.input_ids);
            prop_assert_eq!(j.sample.prompt_len, s.0.prompt_len);
            prop_assert_eq!(j.labels.len(), s.0.input_ids.len() - 1);
            prop_assert!(j.labels.position.iter().enumerate().all(|(p, &q)| p as u32 == q));
        }
        let report = verify(&dir).unwrap();
        prop_assert!(report.is_clean(), "{:?}", report.problems);
        prop_assert_eq!(report.label_rows_checked, manifest.rows(Table::Labels));
    }
}

#[test]
fn samples_table_roundtrip() {
    let tmp = tempdir();
    let dir = tmp.path().join("s");
    let mut samples = vec![sample(vec![1, 2, 3, 4], 2, 3), sample(vec![9, 8], 0, 3)];
    samples[1].0.source = "other".into();
    samples[1].0.split = "valid".into();
    samples[1].0.window_index = 4;
    write_all(&dir, &mut samples, 3, LogprobDtype::Float32, 50, 10);
    let reader = StoreReader::open(&dir).unwrap();
    let batches: Vec<_> = reader
        .batches(
            Table::Samples,
            Some(&[
                "source",
                "split",
                "window_index",
                "input_ids",
                "prompt_len",
                "num_positions",
            ]),
            10,
        )
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert_eq!(b.num_columns(), 6);
    assert_eq!(b.column(0).as_string::<i32>().value(1), "other");
    assert_eq!(b.column(1).as_string::<i32>().value(1), "valid");
    assert_eq!(b.column(2).as_primitive::<UInt32Type>().value(1), 4);
    let ids = b.column(3).as_list::<i32>().value(0);
    assert_eq!(
        ids.as_primitive::<UInt32Type>().values().to_vec(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(b.column(4).as_primitive::<UInt32Type>().value(0), 2);
    assert_eq!(b.column(5).as_primitive::<UInt32Type>().value(0), 3);
    assert!(reader.batches(Table::Samples, Some(&["nope"]), 10).is_err());
}

/// A valid sample with k columns whose targets are outside the top-k.
fn sample(input_ids: Vec<u32>, prompt_len: u32, k: usize) -> (SampleRecord, SampleLabels) {
    let n = input_ids.len() - 1;
    let mut l = SampleLabels::default();
    for p in 0..n {
        for j in 0..k {
            l.topk_ids.push(20 + j as u32);
            l.topk_logprobs.push(-1.0 - j as f32 - p as f32 * 0.01);
        }
        l.target_logprobs.push(-9.0);
        l.entropy.push(1.5);
    }
    let s = SampleRecord {
        sample_id: 0,
        source: "unit".into(),
        split: "train".into(),
        record_index: 0,
        window_index: 0,
        input_ids,
        prompt_len,
    };
    (s, l)
}

#[test]
fn writer_rejects_bad_samples_without_writing() {
    let tmp = tempdir();
    let dir = tmp.path().join("bad");
    let mut w = StoreWriter::create(
        &dir,
        meta(3, LogprobDtype::Float32, 50),
        WriterOptions::default(),
    )
    .unwrap();
    let (s, mut l) = sample(vec![1, 2, 3], 0, 3);
    l.topk_logprobs[1] = f32::NAN;
    let err = w.push(&s, &l).unwrap_err().to_string();
    assert!(err.contains("non-finite"), "{err}");
    let (short, lshort) = sample(vec![1, 2], 0, 3);
    let mut bad = lshort.clone();
    bad.entropy.push(1.0);
    assert!(w
        .push(&short, &bad)
        .unwrap_err()
        .to_string()
        .contains("entropies"));
    let (mut big, lbig) = sample(vec![1, 2, 3], 0, 3);
    big.input_ids[2] = 50;
    assert!(w
        .push(&big, &lbig)
        .unwrap_err()
        .to_string()
        .contains("outside vocabulary"));
    let (one, lone) = sample(vec![1, 2], 0, 3);
    let one = SampleRecord {
        input_ids: vec![1],
        ..one
    };
    assert!(w
        .push(&one, &lone)
        .unwrap_err()
        .to_string()
        .contains("at least 2 tokens"));
    let m = w.finish(serde_json::Value::Null).unwrap();
    assert_eq!(m.rows(Table::Labels), 0);
}

#[test]
fn create_refuses_non_empty_directory() {
    let tmp = tempdir();
    std::fs::write(tmp.path().join("x"), b"x").unwrap();
    let err = StoreWriter::create(
        tmp.path(),
        meta(2, LogprobDtype::Float16, 50),
        WriterOptions::default(),
    );
    assert!(matches!(err, Err(Error::OutputInUse { reason, .. }) if reason.contains("not empty")));
}

#[test]
fn interrupted_store_resumes_to_the_same_content() {
    let k = 3;
    let all: Vec<_> = (0..9u32)
        .map(|i| sample(vec![1 + i, 2, 3, 4 + i, 5], 1 + i % 3, k))
        .collect();
    let tmp = tempdir();

    // Uninterrupted reference run.
    let full = tmp.path().join("full");
    let mut reference = all.clone();
    write_all(&full, &mut reference, k, LogprobDtype::Float16, 50, 3);

    // Interrupted run: two committed parts, then rows pushed and encoded but never committed.
    let dir = tmp.path().join("resumed");
    let opts = || WriterOptions {
        batch_rows: 4,
        ..WriterOptions::default()
    };
    let m = meta(k, LogprobDtype::Float16, 50);
    let mut w = StoreWriter::create(&dir, m.clone(), opts()).unwrap();
    for (i, (s, l)) in all.iter().enumerate().take(8) {
        let s = SampleRecord {
            sample_id: i as u64,
            record_index: i as u64,
            ..s.clone()
        };
        w.push(&s, l).unwrap();
        if i == 2 || i == 5 {
            w.commit(serde_json::json!({ "next": i + 1 })).unwrap();
        }
    }
    // A crash runs no destructor (a writer dropped normally deletes its open part): part 2
    // exists only as temporary files.
    std::mem::forget(w);
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("labels")).unwrap().collect();
    assert_eq!(
        leftovers.len(),
        3,
        "two committed parts + one temporary file"
    );

    // The interrupted store is not mistaken for a complete one.
    assert!(matches!(
        StoreReader::open(&dir),
        Err(Error::IncompleteStore { .. })
    ));
    let report = verify(&dir).unwrap();
    assert!(report
        .problems
        .iter()
        .any(|p| p.message.contains("incomplete")));
    assert!(report
        .problems
        .iter()
        .any(|p| p.message.contains("extra file")));

    // Different settings are refused.
    let mut other = m.clone();
    other.k = 4;
    assert!(matches!(
        StoreWriter::open(&dir, other, opts()),
        Err(Error::OutputInUse { .. })
    ));

    let Opened::Resumed { mut writer, cursor } =
        StoreWriter::open(&dir, m.clone(), opts()).unwrap()
    else {
        panic!("expected a resumable store");
    };
    let next = cursor["next"].as_u64().unwrap() as usize;
    assert_eq!(next, 6);
    for (i, (s, l)) in all.iter().enumerate().skip(next) {
        let s = SampleRecord {
            sample_id: i as u64,
            record_index: i as u64,
            ..s.clone()
        };
        writer.push(&s, l).unwrap();
    }
    writer
        .finish(serde_json::json!({ "next": all.len() }))
        .unwrap();

    assert!(verify(&dir).unwrap().is_clean());
    let a = read_labels(&StoreReader::open(&full).unwrap());
    let b = read_labels(&StoreReader::open(&dir).unwrap());
    assert_eq!(a, b);
    assert!(matches!(
        StoreWriter::open(&dir, m, opts()).unwrap(),
        Opened::Complete(_)
    ));
}

#[test]
fn synthetic_store_is_seeded_and_valid() {
    let tmp = tempdir();
    let (a, ma) = crate::util::small_store(tmp.path(), "a", LogprobDtype::Float16);
    let (b, mb) = crate::util::small_store(tmp.path(), "b", LogprobDtype::Float16);
    assert!(verify(&a).unwrap().is_clean());
    let strip = |m: &firstkd::store::Manifest| {
        m.parts
            .iter()
            .map(|p| p.labels.sha256.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&ma), strip(&mb), "same seed, same bytes");
    let rows = read_labels(&StoreReader::open(&b).unwrap());
    // Realistic: the top-1 carries most but not all mass, the target is often the top-1.
    let mean_top1: f64 =
        rows.iter().map(|r| f64::from(r.5[0]).exp()).sum::<f64>() / rows.len() as f64;
    let top1_hits = rows.iter().filter(|r| r.4[0] == r.2).count() as f64 / rows.len() as f64;
    assert!((0.5..0.95).contains(&mean_top1), "mean top-1 {mean_top1}");
    assert!(
        top1_hits > 0.3 && top1_hits < mean_top1,
        "over-confident: hits {top1_hits} < conf {mean_top1}"
    );
    assert!(rows.iter().any(|r| r.3) && rows.iter().any(|r| !r.3));
}
