//! `firstkd verify`: manifest vs files, schema, and row invariants.

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use serde::Serialize;

use super::decode::{LabelColumn, LabelRows, SampleColumn};
use super::manifest::{Manifest, PartEntry, MANIFEST_FILE};
use super::reader::{check_part_metadata, check_part_schema};
use super::rows::{read_label_file_as, read_sample_file};
use super::sha256_file;
use crate::error::{Error, Result};
use crate::schema::Selection;
use crate::schema::Table;

/// Row-level problems listed per file before the rest are only counted.
const MAX_ROW_PROBLEMS_PER_FILE: usize = 20;
/// Tolerance on total top-k probability.
pub const MASS_TOLERANCE: f64 = 1e-3;

/// One problem found by verify.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// File (relative to the store) the problem is in.
    pub file: String,
    /// 0-based row within that file, when the problem is a row's.
    pub row: Option<u64>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.row {
            Some(row) => write!(f, "{} row {}: {}", self.file, row, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Everything verify found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub parts: usize,
    pub label_rows_checked: u64,
    pub sample_rows_checked: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    fn push(&mut self, file: &str, row: Option<u64>, message: impl Into<String>) {
        self.problems.push(Problem {
            file: file.to_string(),
            row,
            message: message.into(),
        });
    }
}

/// Verifies the store at `dir`. Problems are collected, not returned as errors; an `Err` means
/// verify itself could not run (for example an unreadable directory).
pub fn verify(dir: &Path) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let manifest = match Manifest::load(dir) {
        Ok(m) => m,
        Err(e) => {
            report.push(MANIFEST_FILE, None, e.to_string());
            return Ok(report);
        }
    };
    if !manifest.complete {
        report.push(
            MANIFEST_FILE,
            None,
            "store is incomplete (complete = false): labelling was interrupted or is running",
        );
    }
    if manifest.tokenizer.vocab_size == 0 {
        report.push(MANIFEST_FILE, None, "tokenizer.vocab_size is 0");
    }
    report.parts = manifest.parts.len();
    check_listing(dir, &manifest, &mut report)?;
    let mut seen_samples = HashSet::new();
    for part in &manifest.parts {
        let before = report.problems.len();
        for table in Table::ALL {
            check_file(dir, &manifest, part, table, &mut report);
        }
        if report.problems.len() == before {
            check_rows_guarded(dir, &manifest, part, &mut seen_samples, &mut report);
        }
    }
    Ok(report)
}

/// Files listed vs files present: missing, duplicate and extra files.
fn check_listing(dir: &Path, manifest: &Manifest, report: &mut VerifyReport) -> Result<()> {
    let mut listed = HashSet::new();
    let mut indices = HashSet::new();
    for part in &manifest.parts {
        if !indices.insert(part.index) {
            report.push(
                MANIFEST_FILE,
                None,
                format!("part index {} listed twice", part.index),
            );
        }
        for table in Table::ALL {
            let file = &part.file(table).file;
            if !listed.insert(file.clone()) {
                report.push(MANIFEST_FILE, None, format!("{file} listed twice"));
            }
            if !file.starts_with(&format!("{}/", table.name())) || file.contains("..") {
                report.push(
                    MANIFEST_FILE,
                    None,
                    format!("{file} is not inside {}/", table.name()),
                );
            }
        }
    }
    for table in Table::ALL {
        let sub = dir.join(table.name());
        let entries = match std::fs::read_dir(&sub) {
            Ok(e) => e,
            Err(_) => {
                report.push(table.name(), None, "table folder is missing");
                continue;
            }
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&sub, e))?;
            let name = format!("{}/{}", table.name(), entry.file_name().to_string_lossy());
            if !listed.contains(&name) {
                report.push(
                    &name,
                    None,
                    "extra file not listed in the manifest (an uncommitted or foreign part)",
                );
            }
        }
    }
    Ok(())
}

/// Existence, size, checksum, row count, metadata and schema of one part file.
fn check_file(
    dir: &Path,
    manifest: &Manifest,
    part: &PartEntry,
    table: Table,
    report: &mut VerifyReport,
) {
    let entry = part.file(table);
    let path = dir.join(&entry.file);
    let name = entry.file.as_str();
    let size = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(_) => {
            report.push(
                name,
                None,
                "missing: listed in the manifest but not on disk",
            );
            return;
        }
    };
    if size != entry.bytes {
        report.push(
            name,
            None,
            format!(
                "size is {size} bytes, manifest says {} (truncated or replaced?)",
                entry.bytes
            ),
        );
    }
    match sha256_file(&path) {
        Ok(sum) if sum == entry.sha256 => {}
        Ok(sum) => {
            report.push(
                name,
                None,
                format!("sha256 is {sum}, manifest says {}", entry.sha256),
            );
            return;
        }
        Err(e) => {
            report.push(name, None, e.to_string());
            return;
        }
    }
    let opened = super::reader::open_parquet(&path);
    let builder = match opened {
        Ok(b) => b,
        Err(e) => {
            report.push(name, None, e.to_string());
            return;
        }
    };
    if let Err(e) = check_part_metadata(&path, &builder, table, manifest) {
        report.push(name, None, e.to_string());
    }
    let expected = manifest.table_schema(table);
    if let Err(e) = check_part_schema(&path, builder.schema(), &expected) {
        report.push(name, None, e.to_string());
    }
    let rows = builder.metadata().file_metadata().num_rows();
    if u64::try_from(rows).ok() != Some(entry.rows) {
        report.push(
            name,
            None,
            format!("has {rows} rows, manifest says {}", entry.rows),
        );
    }
}

fn check_rows_guarded(
    dir: &Path,
    manifest: &Manifest,
    part: &PartEntry,
    seen: &mut HashSet<u64>,
    report: &mut VerifyReport,
) {
    // The rows are decoded without a panicking downcast; the guard is for the Parquet
    // decoder itself, which has panicked on hostile pages in the past.
    let result = catch_unwind(AssertUnwindSafe(|| {
        check_rows(dir, manifest, part, seen, report)
    }));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(Error::Corrupt { path, row, reason })) => {
            let file = path
                .strip_prefix(dir)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| part.labels.file.clone());
            report.push(&file, row, format!("corrupt: {reason}"));
        }
        Ok(Err(e)) => report.push(&part.labels.file, None, e.to_string()),
        Err(_) => report.push(
            &part.labels.file,
            None,
            "reading the part failed (the Parquet decoder panicked)",
        ),
    }
}

struct SampleInfo {
    input_ids: Vec<u32>,
    prompt_len: u32,
    num_positions: u32,
}

fn check_rows(
    dir: &Path,
    manifest: &Manifest,
    part: &PartEntry,
    seen: &mut HashSet<u64>,
    report: &mut VerifyReport,
) -> Result<()> {
    let samples_name = part.samples.file.as_str();
    let mut samples: HashMap<u64, SampleInfo> = HashMap::new();
    let vocab = manifest.tokenizer.vocab_size;
    for sample in read_sample_file(&dir.join(samples_name), &SampleColumn::ALL) {
        let sample = sample?;
        let (id, p, n) = (sample.sample_id, sample.prompt_len, sample.num_positions);
        let input_ids = sample.input_ids;
        let mut bad = Vec::new();
        if !seen.insert(id) {
            bad.push(format!("sample_id {id} appears twice in the store"));
        }
        if input_ids.len() < 2 || n as usize != input_ids.len() - 1 {
            bad.push(format!(
                "num_positions {n} but {} input ids",
                input_ids.len()
            ));
        }
        if p as usize > input_ids.len() {
            bad.push(format!("prompt_len {p} > {} input ids", input_ids.len()));
        }
        if let Some(t) = input_ids.iter().find(|&&t| t >= vocab) {
            bad.push(format!("input id {t} outside vocabulary of {vocab}"));
        }
        for message in bad {
            report.push(samples_name, Some(sample.row), message);
        }
        samples.insert(
            id,
            SampleInfo {
                input_ids,
                prompt_len: p,
                num_positions: n,
            },
        );
        report.sample_rows_checked += 1;
    }

    let labels_name = part.labels.file.as_str();
    let mut checker = LabelChecker::new(manifest, labels_name);
    let labels_path = dir.join(labels_name);
    let mut columns = LabelColumn::ALL.to_vec();
    if matches!(manifest.selection(), Selection::Sample { .. }) {
        columns.push(LabelColumn::TopkCounts);
    }
    let layout = (manifest.quantization, manifest.selection().fixed_len());
    for rows in read_label_file_as(&labels_path, manifest.k, layout, &columns, 65536) {
        checker.check_rows(&rows?, &samples, report);
    }
    checker.finish(&samples, report);
    Ok(())
}

struct LabelChecker<'a> {
    file: &'a str,
    vocab: u32,
    selection: Selection,
    prob_slack: f32,
    row: u64,
    listed: usize,
    suppressed: u64,
    current: Option<(u64, u32)>,
    completed: HashSet<u64>,
}

impl<'a> LabelChecker<'a> {
    fn new(manifest: &Manifest, file: &'a str) -> Self {
        LabelChecker {
            file,
            vocab: manifest.tokenizer.vocab_size,
            selection: manifest.selection(),
            // The quantized layout's bound, also for a 1.0 store converted from one.
            prob_slack: 1e-3,
            row: 0,
            listed: 0,
            suppressed: 0,
            current: None,
            completed: HashSet::new(),
        }
    }

    fn problem(&mut self, report: &mut VerifyReport, row: u64, message: String) {
        if self.listed < MAX_ROW_PROBLEMS_PER_FILE {
            report.push(self.file, Some(row), message);
            self.listed += 1;
        } else {
            self.suppressed += 1;
        }
    }

    fn check_rows(
        &mut self,
        rows: &LabelRows,
        samples: &HashMap<u64, SampleInfo>,
        report: &mut VerifyReport,
    ) {
        let mut messages = Vec::new();
        for i in 0..rows.len() {
            let row = self.row + i as u64;
            let (sid, pos) = (rows.sample_id[i], rows.position[i]);
            let target = rows.target_id[i];
            messages.clear();
            // Positions contiguous per sample, samples not interleaved.
            match self.current {
                Some((cur, last)) if cur == sid => {
                    if pos != last + 1 {
                        messages.push(format!("sample {sid}: position {pos} follows {last}"));
                    }
                }
                previous => {
                    if let Some((prev, last)) = previous {
                        self.close_sample(prev, last, samples, row, &mut messages);
                    }
                    if self.completed.contains(&sid) {
                        messages.push(format!("sample {sid}: rows are not contiguous"));
                    }
                    if pos != 0 {
                        messages.push(format!("sample {sid}: first position is {pos}, expected 0"));
                    }
                }
            }
            self.current = Some((sid, pos));
            match samples.get(&sid) {
                None => messages.push(format!("sample {sid} is not in this part's samples file")),
                Some(info) => {
                    let expect = info.input_ids.get(pos as usize + 1).copied();
                    if expect != Some(target) {
                        messages.push(format!(
                            "target_id {target} but input_ids[{}] is {expect:?}",
                            pos + 1,
                        ));
                    }
                    let want_loss = pos as u64 + 1 >= u64::from(info.prompt_len);
                    if rows.in_loss[i] != want_loss {
                        messages.push(format!(
                            "in_loss {} but prompt_len {} says {want_loss}",
                            rows.in_loss[i], info.prompt_len
                        ));
                    }
                }
            }
            let (ids, lps) = (rows.ids(i), rows.logprobs(i));
            check_topk(ids, lps, self.vocab, &mut messages);
            check_selection(self.selection, lps, rows.counts(i), &mut messages);
            check_target(
                target,
                rows.target_logprob[i],
                (ids, lps),
                // A sampled list is not the most probable tokens: any target may be outside.
                if matches!(self.selection, Selection::Sample { .. }) {
                    f32::INFINITY
                } else {
                    self.prob_slack
                },
                &mut messages,
            );
            let h = rows.entropy[i];
            if !h.is_finite() || h < -1e-3 {
                messages.push(format!("entropy {h} is not a finite value >= 0"));
            }
            for m in messages.drain(..) {
                self.problem(report, row, m);
            }
        }
        self.row += rows.len() as u64;
        report.label_rows_checked += rows.len() as u64;
    }

    fn close_sample(
        &mut self,
        sid: u64,
        last: u32,
        samples: &HashMap<u64, SampleInfo>,
        _row: u64,
        messages: &mut Vec<String>,
    ) {
        self.completed.insert(sid);
        if let Some(info) = samples.get(&sid) {
            if last + 1 != info.num_positions {
                messages.push(format!(
                    "sample {sid}: has {} label rows, samples says {}",
                    last + 1,
                    info.num_positions
                ));
            }
        }
    }

    fn finish(mut self, samples: &HashMap<u64, SampleInfo>, report: &mut VerifyReport) {
        let mut messages = Vec::new();
        if let Some((sid, last)) = self.current {
            self.close_sample(sid, last, samples, self.row, &mut messages);
        }
        let mut missing: Vec<u64> = samples
            .keys()
            .filter(|id| !self.completed.contains(id))
            .copied()
            .collect();
        missing.sort_unstable();
        for sid in missing {
            messages.push(format!("sample {sid} has no label rows"));
        }
        let row = self.row.saturating_sub(1);
        for m in messages {
            self.problem(report, row, m);
        }
        if self.suppressed > 0 {
            report.push(
                self.file,
                None,
                format!("... and {} more row problems", self.suppressed),
            );
        }
    }
}

/// Row invariants of one top-k list.
pub fn check_topk(ids: &[u32], lps: &[f32], vocab: u32, messages: &mut Vec<String>) {
    if let Some(id) = ids.iter().find(|&&id| id >= vocab) {
        messages.push(format!("top-k id {id} outside vocabulary of {vocab}"));
    }
    for (a, id) in ids.iter().enumerate() {
        if ids[..a].contains(id) {
            messages.push(format!("top-k id {id} repeated"));
        }
    }
    if let Some(lp) = lps.iter().find(|lp| !lp.is_finite() || **lp > 0.0) {
        messages.push(format!("top-k log-prob {lp} is not a finite value <= 0"));
        return;
    }
    for j in 1..lps.len() {
        let (prev, cur) = (lps[j - 1], lps[j]);
        if cur > prev || (cur == prev && ids[j] < ids[j - 1]) {
            messages.push(format!(
                "top-k not descending at {j}: ({}, {prev}) before ({}, {cur})",
                ids[j - 1],
                ids[j]
            ));
            break;
        }
    }
    let mass: f64 = lps.iter().map(|&lp| f64::from(lp).exp()).sum();
    if mass > 1.0 + MASS_TOLERANCE {
        messages.push(format!("top-k probability mass {mass:.6} > 1"));
    }
}

/// The rules of the store's selection for one row: top-p lists are the smallest prefix
/// reaching the mass (or as long as allowed), sample lists' draws add up.
fn check_selection(selection: Selection, lps: &[f32], counts: &[u16], messages: &mut Vec<String>) {
    // The quantized layout's bound on one probability, summed over a list.
    let slack = 1e-3 * lps.len().max(1) as f64;
    match selection {
        Selection::TopK { k } => {
            if lps.len() != k {
                messages.push(format!(
                    "top-k list of {} entries, the store's k is {k}",
                    lps.len()
                ));
            }
        }
        Selection::TopP { p, max } => {
            let probs: Vec<f64> = lps.iter().map(|&l| f64::from(l).exp()).collect();
            let mass: f64 = probs.iter().sum();
            let before: f64 = mass - probs.last().copied().unwrap_or(0.0);
            if lps.is_empty() || lps.len() > max {
                messages.push(format!(
                    "top-p list of {} entries (1..={max} allowed)",
                    lps.len()
                ));
            } else if mass + slack < p && lps.len() < max {
                messages.push(format!(
                    "top-p list of {} entries holds {mass:.4}, below p = {p}, and is shorter than {max}",
                    lps.len()
                ));
            } else if before > p + slack {
                messages.push(format!(
                    "top-p list is longer than needed: its first {} entries already hold {before:.4} >= p = {p}",
                    lps.len() - 1
                ));
            }
        }
        Selection::Sample { draws, .. } => {
            let total: u32 = counts.iter().map(|&c| u32::from(c)).sum();
            if counts.len() != lps.len() || total != draws || counts.contains(&0) {
                messages.push(format!(
                    "draw counts {counts:?} for {} ids do not add up to {draws}",
                    lps.len()
                ));
            }
        }
    }
}

/// `prob_slack`: how far above the k-th probability a target outside the list may decode
/// (the 2.0 layout stores list probabilities within 1e-3, the target's in fine log steps).
fn check_target(
    target: u32,
    lp: f32,
    (ids, lps): (&[u32], &[f32]),
    prob_slack: f32,
    messages: &mut Vec<String>,
) {
    if !lp.is_finite() || lp > 0.0 {
        messages.push(format!("target_logprob {lp} is not a finite value <= 0"));
        return;
    }
    let tolerance = |x: f32| 2e-3 + 2e-3 * x.abs();
    match ids.iter().position(|&id| id == target) {
        Some(j) => {
            if (lp - lps[j]).abs() > tolerance(lps[j]) {
                messages.push(format!(
                    "target_logprob {lp} differs from its top-k log-prob {}",
                    lps[j]
                ));
            }
        }
        None => {
            if let Some(&last) = lps.last() {
                if lp > last + tolerance(last) && lp.exp() > last.exp() + prob_slack {
                    messages.push(format!(
                        "target {target} is outside the top-k but its log-prob {lp} exceeds the k-th {last}"
                    ));
                }
            }
        }
    }
}
