//! `firstkd card`: a Hugging Face dataset card (`README.md` with a YAML header) written into
//! a store, with its plots in `card/`, so a store pushed to the Hub or copied to another team
//! says what it is and how to read it without firstkd.
//!
//! The card is derived from the manifest and the data only (provenance, teacher and
//! tokenizer hashes, k, selection, temperature and how it was fitted, coverage and
//! calibration from the same SQL as `firstkd stats`, sizes), so writing it again gives the
//! same card. `verify` ignores both (they are outside `labels/` and `samples/`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::query::stats::{self, StatsOptions};
use crate::query::{QueryOptions, QuerySession};
use crate::schema::{self, Table};
use crate::store::inspect::{human_bytes, summarize};
use crate::store::StoreReader;

/// Options of [`write_card`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CardOptions {
    /// SPDX licence id of the labels (default `other`: say it, the card cannot know).
    pub license: Option<String>,
    /// Title (default: teacher name and store directory).
    pub title: Option<String>,
}

/// The Hugging Face size category of `n` rows.
pub fn size_category(n: u64) -> &'static str {
    const CATS: [(u64, &str); 10] = [
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
        (1_000_000_000, "100M<n<1B"),
        (10_000_000_000, "1B<n<10B"),
        (100_000_000_000, "10B<n<100B"),
        (1_000_000_000_000, "100B<n<1T"),
    ];
    CATS.iter()
        .find(|(upper, _)| n < *upper)
        .map_or("n>1T", |(_, c)| c)
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Writes `README.md` and `card/{reliability,coverage}.svg` into the complete store `dir`;
/// returns the card's path.
pub fn write_card(dir: &Path, opts: &CardOptions) -> Result<PathBuf> {
    let reader = StoreReader::open(dir)?;
    let m = reader.manifest().clone();
    let summary = summarize(dir)?;
    let session = QuerySession::open(dir, &QueryOptions::default())?;
    let stat_opts = StatsOptions {
        temperature: crate::Temperature::ONE,
        mode: crate::calibration::TemperatureMode::UniformTail,
        n_bins: 15,
    };
    let coverage = stats::coverage(&session, &stat_opts)?;
    let calibration = stats::calibration(&session, &stat_opts)?;
    let plots = dir.join("card");
    stats::write_plots(&plots, &session, Some(&calibration), &stat_opts)?;
    let license = opts.license.clone().unwrap_or_else(|| "other".into());
    let title = opts
        .title
        .clone()
        .unwrap_or_else(|| format!("{} soft labels (top-{}, firstkd)", m.teacher.file_name, m.k));
    let quantized = m.quantization.is_some();
    let mut c = String::new();
    // YAML header: the Hub's dataset card metadata.
    let _ = writeln!(c, "---");
    let _ = writeln!(c, "license: {license}");
    let _ = writeln!(c, "pretty_name: {}", yaml_str(&title));
    let _ = writeln!(c, "task_categories:\n- text-generation");
    let _ = writeln!(
        c,
        "tags:\n- knowledge-distillation\n- soft-labels\n- firstkd\n- teacher-top-k"
    );
    let _ = writeln!(
        c,
        "size_categories:\n- {}",
        size_category(summary.label_rows)
    );
    let _ = writeln!(c, "configs:");
    for (name, table) in [("labels", Table::Labels), ("samples", Table::Samples)] {
        let _ = writeln!(
            c,
            "- config_name: {name}\n  data_files:\n  - split: train\n    path: {}/*.parquet",
            table.name()
        );
    }
    let _ = writeln!(c, "---\n");
    let _ = writeln!(c, "# {title}\n");
    let _ = writeln!(
        c,
        "Teacher soft labels for knowledge distillation: at every token position the teacher's \
         {} token ids with their log-probabilities, in a firstkd store (format {}, \
         `manifest.json` + zstd Parquet). Written by `firstkd card` from the manifest and the \
         data; rerun it after changing the store.\n",
        m.selection(),
        m.schema_version
    );
    let _ = writeln!(c, "## Provenance\n");
    let _ = writeln!(c, "| field | value |\n|---|---|");
    let t = &m.teacher;
    for (k, v) in [
        ("teacher", t.file_name.clone()),
        ("teacher sha256", t.sha256.clone()),
        ("architecture", t.architecture.clone()),
        ("weights", t.quantization.clone()),
        (
            "computed with",
            format!("{} ({})", t.compute_dtype, t.compute_mode),
        ),
        ("tokenizer sha256", m.tokenizer.sha256.clone()),
        ("vocabulary", m.tokenizer.vocab_size.to_string()),
        ("selection", m.selection().to_string()),
        ("k (longest list)", m.k.to_string()),
        ("log-prob storage", m.logprob_dtype.name().to_string()),
        ("schema version", m.schema_version.clone()),
        ("created by", m.created_by.clone()),
    ] {
        let _ = writeln!(c, "| {k} | `{}` |", v.replace('|', "\\|"));
    }
    let _ = writeln!(
        c,
        "\nHow the labels were produced (inputs, sequence length, template), as the manifest's \
         `labeling` records it:\n\n```json\n{}\n```\n",
        serde_json::to_string_pretty(&m.labeling)?
    );
    let _ = writeln!(c, "## Temperature\n");
    match &m.temperature {
        Some(t) => {
            let _ = writeln!(
                c,
                "Fitted T = **{:.4}** by {} (objective `{}`), on:\n\n```json\n{}\n```\n\n\
                 Before (T = 1) and after:\n\n```json\n{}\n{}\n```\n\n\
                 FIRST teaches `softmax(log p / T)` over each position's entries.\n",
                t.value,
                t.fitted_by,
                t.objective,
                serde_json::to_string_pretty(&t.fitted_on)?,
                serde_json::to_string(&t.before)?,
                serde_json::to_string(&t.after)?
            );
        }
        None => {
            let _ = writeln!(
                c,
                "No temperature fitted (`firstkd calibrate STORE` fits one on held-out data).\n"
            );
        }
    }
    let _ = writeln!(c, "## Coverage\n");
    let _ = writeln!(
        c,
        "Mean cumulative probability mass of the first j entries (temperature 1), from \
         `firstkd stats --report coverage`:\n"
    );
    let mut header = "| positions | n |".to_string();
    let mut rule = "|---|---:|".to_string();
    for j in 1..=coverage.k {
        let _ = write!(header, " mass@{j} |");
        rule.push_str("---:|");
    }
    let _ = write!(header, " share with mass@{} >= 0.95 |", coverage.k);
    rule.push_str("---:|");
    let _ = writeln!(c, "{header}\n{rule}");
    for r in coverage
        .rows
        .iter()
        .filter(|r| r.source.is_none() && r.split.is_none())
    {
        let mut line = format!("| {} | {} |", r.positions, r.n);
        for v in &r.mean_mass {
            let _ = write!(line, " {v:.4} |");
        }
        let _ = write!(line, " {:.4} |", r.frac_topk_mass_ge_095);
        let _ = writeln!(c, "{line}");
    }
    let _ = writeln!(c, "\n![coverage](card/coverage.svg)\n");
    let _ = writeln!(c, "## Calibration of the teacher\n");
    let _ = writeln!(
        c,
        "Next-token calibration at T = 1 ({} equal-width bins; `firstkd stats --report calibration`):\n",
        calibration.n_bins
    );
    let _ = writeln!(
        c,
        "| positions | n | accuracy | confidence | ECE | MCE |\n|---|---:|---:|---:|---:|---:|"
    );
    for g in calibration
        .groups
        .iter()
        .filter(|g| g.source.is_none() && g.split.is_none())
    {
        let r = &g.report;
        let _ = writeln!(
            c,
            "| {} | {} | {:.4} | {:.4} | {:.4} | {:.4} |",
            g.positions, r.n, r.accuracy, r.mean_confidence, r.ece, r.mce
        );
    }
    let _ = writeln!(c, "\n![reliability](card/reliability.svg)\n");
    let _ = writeln!(c, "## Size\n");
    let _ = writeln!(
        c,
        "| | value |\n|---|---:|\n| samples | {} |\n| token positions (label rows) | {} |\n\
         | in-loss positions | {} |\n| parts | {} |\n| labels | {} ({:.2} bytes per token) |\n\
         | samples table | {} |\n| whole store | {} ({:.2} bytes per token) |\n",
        summary.samples,
        summary.label_rows,
        summary.in_loss_rows,
        summary.parts,
        human_bytes(summary.labels_bytes),
        summary.labels_bytes_per_token,
        human_bytes(summary.samples_bytes),
        human_bytes(summary.bytes_on_disk),
        summary.total_bytes_per_token
    );
    let _ = writeln!(c, "## Schema\n");
    for table in Table::ALL {
        let _ = writeln!(
            c,
            "`{}/*.parquet`:\n\n| column | type | nullable |\n|---|---|---|",
            table.name()
        );
        for (name, ty, nullable) in schema::describe(&reader.schema(table), m.k) {
            let _ = writeln!(c, "| `{name}` | `{ty}` | {nullable} |");
        }
        let _ = writeln!(c);
    }
    c.push_str(&loading_section(quantized));
    let path = dir.join("README.md");
    let tmp = dir.join(".README.md.tmp");
    std::fs::write(&tmp, c).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

fn loading_section(quantized: bool) -> String {
    let decode_note = if quantized {
        "Format 2.0 stores probabilities as integers: `p = topk_probs_q / 1024` (a 0 means \
         below 1/2048; use 0.001/1024), `entropy = entropy_q / 64`, \
         `target_logprob = -target_logprob_q / 256` where not null (null: the target is in the \
         list; take its probability from there), `target_id = input_ids[position + 1]` of the \
         sample. `schemas/decode/duckdb.sql` and `schemas/decode/spark.sql` in the firstkd \
         repository give the full decoding as SQL."
    } else {
        "Format 1.0 stores `topk_logprobs` as natural-log probabilities (float32 or float16)."
    };
    let probs = if quantized {
        "[q / 1024 for q in row['topk_probs_q']]"
    } else {
        "[math.exp(l) for l in row['topk_logprobs']]"
    };
    let duck = if quantized {
        "list_transform(topk_probs_q, lambda q: q / 1024.0)"
    } else {
        "list_transform(topk_logprobs, lambda l: exp(l))"
    };
    let polars = if quantized {
        "pl.col('topk_probs_q').list.eval(pl.element() / 1024)"
    } else {
        "pl.col('topk_logprobs').list.eval(pl.element().exp())"
    };
    format!(
        "## Loading without firstkd\n\n{decode_note}\n\n\
         pyarrow / pandas:\n\n```python\nimport math, pyarrow.dataset as ds\n\
         labels = ds.dataset('labels', format='parquet').to_table()\n\
         samples = ds.dataset('samples', format='parquet').to_table().to_pandas()\n\
         row = labels.slice(0, 1).to_pylist()[0]\nprint(row['topk_ids'], {probs})\n```\n\n\
         DuckDB:\n\n```sql\nSELECT sample_id, position, topk_ids, {duck} AS probs\n\
         FROM read_parquet('labels/*.parquet') LIMIT 5;\n```\n\n\
         polars:\n\n```python\nimport polars as pl\n\
         labels = pl.scan_parquet('labels/*.parquet').with_columns(probs={polars})\n\
         print(labels.head().collect())\n```\n\n\
         Hugging Face `datasets` (the `configs` of this card):\n\n```python\n\
         from datasets import load_dataset\n\
         labels = load_dataset('parquet', data_files='labels/*.parquet', split='train')\n\
         samples = load_dataset('parquet', data_files='samples/*.parquet', split='train')\n```\n\n\
         Each part's key-value metadata (`firstkd.schema_version`, `firstkd.teacher`, \
         `firstkd.tokenizer`, ...) repeats the provenance. To train with axolotl, \
         `firstkd export --format axolotl` writes its KD layout.\n"
    )
}

/// The dataset card of an axolotl export: `README.md` in the export directory, with the
/// source store's provenance, the temperature baked in, the alignment and how to load it.
pub(crate) fn write_export_card(
    out: &Path,
    description: &serde_json::Value,
    files: &[(String, u64)],
) -> Result<PathBuf> {
    let rows: u64 = files.iter().map(|f| f.1).sum();
    let mut splits: Vec<String> = files
        .iter()
        .filter_map(|(f, _)| {
            let name = f.strip_prefix("data/")?;
            Some(name.rsplit_once('-')?.0.to_string())
        })
        .collect();
    splits.sort();
    splits.dedup();
    let ext = if description["file_format"] == "jsonl" {
        "jsonl"
    } else {
        "parquet"
    };
    let d = |key: &str| description[key].clone();
    let temperature = match d("temperature").as_f64() {
        Some(t) => format!(
            "T = {t} ({}), baked in: each position's `target_logprobs` are `log softmax(l / T)` \
             over its entries. Train at `kd_temperature: 1.0`.",
            d("temperature_source").as_str().unwrap_or("")
        ),
        None => "raw: the teacher's full-vocabulary log-probabilities at T = 1, not \
                 renormalised (axolotl's dataset `temperature` is 1)."
            .to_string(),
    };
    let mut c = String::new();
    let _ = writeln!(
        c,
        "---\nlicense: other\ntask_categories:\n- text-generation"
    );
    let _ = writeln!(c, "tags:\n- knowledge-distillation\n- axolotl\n- firstkd");
    let _ = writeln!(c, "size_categories:\n- {}", size_category(rows));
    let _ = writeln!(c, "configs:\n- config_name: default\n  data_files:");
    for s in &splits {
        let _ = writeln!(c, "  - split: {s}\n    path: data/{s}-*.{ext}");
    }
    let _ = writeln!(c, "---\n");
    let teacher = &description["teacher"];
    let _ = writeln!(
        c,
        "# Teacher top-k soft labels for axolotl's KD trainer\n\n\
         Exported by `{}` from a firstkd store (`{}`, format {}): {rows} sequences, selection \
         `{}`, k = {}.\n\n\
         | | |\n|---|---|\n| teacher | `{}` |\n| teacher sha256 | `{}` |\n| tokenizer sha256 | `{}` |\n\
         | vocabulary | {} |\n\n\
         **Temperature**: {temperature}\n\n\
         **Layout** (one row per sequence of L tokens): `input_ids`, `attention_mask`, `labels` \
         (-100 where not trained, unshifted), and per position lists of k `target_token_ids`, \
         `target_logprobs`, `target_mask`. Target row i is the teacher's distribution of the \
         token after `input_ids[i]`; `target_mask[i]` is 1 where `labels[i + 1] != -100`; the \
         last row and short rows are padded with id 0, log-prob -1e9, mask 0.\n\n\
         ```python\nfrom datasets import load_dataset\nds = load_dataset('parquet', data_dir='.')\n```\n\n\
         `firstkd_export.json` holds the full description; `firstkd import --format axolotl` \
         reads the files back into a store.\n",
        d("exported_by").as_str().unwrap_or(""),
        d("store").as_str().unwrap_or(""),
        d("store_schema_version").as_str().unwrap_or(""),
        d("selection").as_str().unwrap_or(""),
        d("k"),
        teacher["file_name"].as_str().unwrap_or(""),
        teacher["sha256"].as_str().unwrap_or(""),
        description["tokenizer"]["sha256"].as_str().unwrap_or(""),
        description["tokenizer"]["vocab_size"],
    );
    let path = out.join("README.md");
    let tmp = out.join(".README.md.tmp");
    std::fs::write(&tmp, c).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_categories_are_the_hubs() {
        assert_eq!(size_category(0), "n<1K");
        assert_eq!(size_category(999), "n<1K");
        assert_eq!(size_category(1_000), "1K<n<10K");
        assert_eq!(size_category(5_086), "1K<n<10K");
        assert_eq!(size_category(2_000_000_000), "1B<n<10B");
        assert_eq!(size_category(u64::MAX), "n>1T");
    }
}
