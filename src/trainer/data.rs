//! Streaming training data: store parts in order, samples joined with their label rows,
//! cut into windows, shuffled through a seeded buffer and padded (or packed several to a row)
//! into token-budget batches.
//!
//! Memory is bounded by one part's `samples` rows, one Arrow batch of `labels` rows, the
//! shuffle buffer and the batches queued in the channel, whatever the store size.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};

use arrow::array::{AsArray, BooleanArray, FixedSizeListArray, UInt32Array, UInt64Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float32Type, UInt32Type, UInt64Type};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReader;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::schema::{labels, samples, Table};
use crate::store::StoreReader;

/// Label rows per Arrow batch when reading.
const LABEL_BATCH_ROWS: usize = 8192;

/// A training sequence: `tokens` (length `n + 1`) with the teacher's labels of its `n`
/// positions; position `p` predicts `tokens[p + 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// The store sample it comes from.
    pub sample_id: u64,
    /// Token ids, one more than the positions.
    pub tokens: Vec<u32>,
    /// Whether each position is in the loss.
    pub in_loss: Vec<bool>,
    /// `n * k` teacher ids.
    pub topk_ids: Vec<u32>,
    /// `n * k` teacher log-probs (f32).
    pub topk_logprobs: Vec<f32>,
}

impl Sequence {
    /// Number of positions (= input tokens fed to the student).
    pub fn positions(&self) -> usize {
        self.in_loss.len()
    }
}

/// A padded batch. Row `b` holds `lengths[b]` input tokens followed by padding (id 0); the
/// tokens are one sequence, or several back to back when packing (`segments[b]` lists their
/// lengths). Only in-loss positions carry targets, listed in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Rows.
    pub rows: usize,
    /// Padded length.
    pub seq_len: usize,
    /// `rows * seq_len` input ids.
    pub input_ids: Vec<u32>,
    /// Real tokens per row.
    pub lengths: Vec<usize>,
    /// Lengths of the sequences in each row, in order (one per row unless packed).
    pub segments: Vec<Vec<usize>>,
    /// Flat index `b * seq_len + p` of each in-loss position.
    pub loss_rows: Vec<u32>,
    /// Actual next token of each in-loss position.
    pub targets: Vec<u32>,
    /// `loss_rows.len() * k` teacher ids.
    pub topk_ids: Vec<u32>,
    /// `loss_rows.len() * k` teacher log-probs.
    pub topk_logprobs: Vec<f32>,
    /// Epoch the batch belongs to (0-based).
    pub epoch: u64,
}

impl Batch {
    /// Number of in-loss positions.
    pub fn loss_positions(&self) -> usize {
        self.targets.len()
    }

    /// Real (non-padding) input tokens.
    pub fn tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// One sequence per row, right-padded.
    pub fn from_sequences(seqs: &[Sequence], k: usize, epoch: u64) -> Batch {
        let rows: Vec<Vec<&Sequence>> = seqs.iter().map(|s| vec![s]).collect();
        Batch::from_rows(&rows, k, epoch)
    }

    /// Rows of sequences placed back to back (packing), right-padded to the fullest row.
    pub fn from_rows(rows: &[Vec<&Sequence>], k: usize, epoch: u64) -> Batch {
        let fill = |row: &Vec<&Sequence>| row.iter().map(|s| s.positions()).sum::<usize>();
        let seq_len = rows.iter().map(fill).max().unwrap_or(0);
        let mut b = Batch {
            rows: rows.len(),
            seq_len,
            input_ids: vec![0; rows.len() * seq_len],
            lengths: Vec::with_capacity(rows.len()),
            segments: Vec::with_capacity(rows.len()),
            loss_rows: Vec::new(),
            targets: Vec::new(),
            topk_ids: Vec::new(),
            topk_logprobs: Vec::new(),
            epoch,
        };
        for (r, row) in rows.iter().enumerate() {
            let mut start = r * seq_len;
            for s in row {
                let n = s.positions();
                b.input_ids[start..start + n].copy_from_slice(&s.tokens[..n]);
                for p in (0..n).filter(|&p| s.in_loss[p]) {
                    b.loss_rows.push((start + p) as u32);
                    b.targets.push(s.tokens[p + 1]);
                    b.topk_ids
                        .extend_from_slice(&s.topk_ids[p * k..(p + 1) * k]);
                    b.topk_logprobs
                        .extend_from_slice(&s.topk_logprobs[p * k..(p + 1) * k]);
                }
                start += n;
            }
            b.lengths.push(fill(row));
            b.segments.push(row.iter().map(|s| s.positions()).collect());
        }
        b
    }
}

/// What to stream and how.
#[derive(Debug, Clone, PartialEq)]
pub struct DataOptions {
    /// The `samples.split` value to read (e.g. `train`).
    pub split: String,
    /// Padded tokens per batch (`rows * longest`) at most.
    pub batch_tokens: usize,
    /// Longer samples are cut into windows of this many positions.
    pub max_positions: usize,
    /// Sequences held in the shuffle buffer (1 = store order).
    pub shuffle_buffer: usize,
    /// Seed of the shuffle.
    pub seed: u64,
    /// Stop after this many passes over the data (None = cycle forever).
    pub epochs: Option<u64>,
    /// Pack several sequences into each row of `max_positions` tokens (next-fit, in stream
    /// order; a sequence is never split across rows) instead of one padded sequence per row.
    pub pack: bool,
}

struct SampleRow {
    sample_id: u64,
    keep: bool,
    input_ids: Vec<u32>,
    num_positions: usize,
}

struct LabelBatch {
    sample_id: UInt64Array,
    position: UInt32Array,
    in_loss: BooleanArray,
    topk_ids: UInt32Array,
    topk_logprobs: arrow::array::Float32Array,
}

struct PartState {
    labels_path: PathBuf,
    samples: Vec<SampleRow>,
    next_sample: usize,
    labels: ParquetRecordBatchReader,
    batch: Option<LabelBatch>,
    row: usize,
}

/// One pass over the sequences of a split, in store order.
pub struct SequenceReader {
    reader: StoreReader,
    split: String,
    max_positions: usize,
    k: usize,
    next_part: usize,
    part: Option<PartState>,
    pending: VecDeque<Sequence>,
    failed: bool,
}

fn corrupt(path: &std::path::Path, reason: String) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

fn flat_list<'a>(
    batch: &'a RecordBatch,
    name: &str,
    k: usize,
    path: &std::path::Path,
) -> Result<&'a FixedSizeListArray> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| corrupt(path, format!("no column {name}")))?;
    let list = col
        .as_fixed_size_list_opt()
        .ok_or_else(|| corrupt(path, format!("column {name} is not a fixed-size list")))?;
    if list.value_length() as usize != k {
        return Err(corrupt(
            path,
            format!(
                "column {name} has lists of {}, manifest says k = {k}",
                list.value_length()
            ),
        ));
    }
    Ok(list)
}

fn decode_labels(batch: &RecordBatch, k: usize, path: &std::path::Path) -> Result<LabelBatch> {
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| corrupt(path, format!("no column {name}")))
    };
    let type_err = |name: &str| corrupt(path, format!("column {name} has an unexpected type"));
    let sample_id = col(labels::SAMPLE_ID)?
        .as_primitive_opt::<UInt64Type>()
        .ok_or_else(|| type_err(labels::SAMPLE_ID))?
        .clone();
    let position = col(labels::POSITION)?
        .as_primitive_opt::<UInt32Type>()
        .ok_or_else(|| type_err(labels::POSITION))?
        .clone();
    let in_loss = col(labels::IN_LOSS)?
        .as_boolean_opt()
        .ok_or_else(|| type_err(labels::IN_LOSS))?
        .clone();
    let ids = flat_list(batch, labels::TOPK_IDS, k, path)?;
    let topk_ids = ids
        .values()
        .as_primitive_opt::<UInt32Type>()
        .ok_or_else(|| type_err(labels::TOPK_IDS))?
        .clone();
    let lps = flat_list(batch, labels::TOPK_LOGPROBS, k, path)?;
    let lps32 = cast(lps.values(), &DataType::Float32)?;
    let topk_logprobs = lps32
        .as_primitive_opt::<Float32Type>()
        .ok_or_else(|| type_err(labels::TOPK_LOGPROBS))?
        .clone();
    if topk_ids.len() != batch.num_rows() * k || topk_logprobs.len() != batch.num_rows() * k {
        return Err(corrupt(
            path,
            "top-k lists do not match the row count".into(),
        ));
    }
    Ok(LabelBatch {
        sample_id,
        position,
        in_loss,
        topk_ids,
        topk_logprobs,
    })
}

impl SequenceReader {
    /// Starts a pass over the samples of `split`; samples longer than `max_positions`
    /// positions are cut into consecutive windows. Sequences without in-loss positions are
    /// skipped.
    pub fn new(reader: StoreReader, split: &str, max_positions: usize) -> Self {
        let k = reader.manifest().k;
        SequenceReader {
            reader,
            split: split.to_string(),
            max_positions: max_positions.max(1),
            k,
            next_part: 0,
            part: None,
            pending: VecDeque::new(),
            failed: false,
        }
    }

    fn open_next_part(&mut self) -> Result<bool> {
        let Some(entry) = self.reader.manifest().parts.get(self.next_part).cloned() else {
            return Ok(false);
        };
        self.next_part += 1;
        let samples_path = self.reader.dir().join(&entry.samples.file);
        let schema = self.reader.schema(Table::Samples);
        let idx = |name: &str| schema.index_of(name).map_err(Error::from);
        let cols = [
            idx(samples::SAMPLE_ID)?,
            idx(samples::SPLIT)?,
            idx(samples::INPUT_IDS)?,
            idx(samples::NUM_POSITIONS)?,
        ];
        let mut rows = Vec::new();
        for batch in self.reader.open_part(&entry, Table::Samples, &cols, 8192)? {
            let batch = batch.map_err(|e| corrupt(&samples_path, format!("reading rows: {e}")))?;
            let bad = |n: &str| corrupt(&samples_path, format!("column {n} missing or mistyped"));
            let ids = batch
                .column_by_name(samples::SAMPLE_ID)
                .and_then(|c| c.as_primitive_opt::<UInt64Type>())
                .ok_or_else(|| bad(samples::SAMPLE_ID))?;
            let split = batch
                .column_by_name(samples::SPLIT)
                .and_then(|c| c.as_string_opt::<i32>())
                .ok_or_else(|| bad(samples::SPLIT))?;
            let input = batch
                .column_by_name(samples::INPUT_IDS)
                .and_then(|c| c.as_list_opt::<i32>())
                .ok_or_else(|| bad(samples::INPUT_IDS))?;
            let npos = batch
                .column_by_name(samples::NUM_POSITIONS)
                .and_then(|c| c.as_primitive_opt::<UInt32Type>())
                .ok_or_else(|| bad(samples::NUM_POSITIONS))?;
            for r in 0..batch.num_rows() {
                let keep = split.value(r) == self.split;
                let input_ids = if keep {
                    let v = input.value(r);
                    v.as_primitive_opt::<UInt32Type>()
                        .ok_or_else(|| bad(samples::INPUT_IDS))?
                        .values()
                        .to_vec()
                } else {
                    Vec::new()
                };
                rows.push(SampleRow {
                    sample_id: ids.value(r),
                    keep,
                    input_ids,
                    num_positions: npos.value(r) as usize,
                });
            }
        }
        let lschema = self.reader.schema(Table::Labels);
        let lidx = |name: &str| lschema.index_of(name).map_err(Error::from);
        let lcols = [
            lidx(labels::SAMPLE_ID)?,
            lidx(labels::POSITION)?,
            lidx(labels::IN_LOSS)?,
            lidx(labels::TOPK_IDS)?,
            lidx(labels::TOPK_LOGPROBS)?,
        ];
        let labels = self
            .reader
            .open_part(&entry, Table::Labels, &lcols, LABEL_BATCH_ROWS)?;
        self.part = Some(PartState {
            labels_path: self.reader.dir().join(&entry.labels.file),
            samples: rows,
            next_sample: 0,
            labels,
            batch: None,
            row: 0,
        });
        Ok(true)
    }

    /// Reads the next sample of the open part (None when the part is done).
    fn next_sample(&mut self) -> Result<Option<Sequence>> {
        let k = self.k;
        let Some(part) = self.part.as_mut() else {
            return Ok(None);
        };
        let Some(sample) = part.samples.get(part.next_sample) else {
            return Ok(None);
        };
        part.next_sample += 1;
        let (id, n, keep) = (sample.sample_id, sample.num_positions, sample.keep);
        let tokens = sample.input_ids.clone();
        if keep && tokens.len() != n + 1 {
            return Err(corrupt(
                &part.labels_path,
                format!(
                    "sample {id}: {} input ids but num_positions {n}",
                    tokens.len()
                ),
            ));
        }
        let mut seq = Sequence {
            sample_id: id,
            tokens,
            in_loss: Vec::with_capacity(if keep { n } else { 0 }),
            topk_ids: Vec::new(),
            topk_logprobs: Vec::new(),
        };
        let mut done = 0;
        while done < n {
            let exhausted = part
                .batch
                .as_ref()
                .is_none_or(|b| part.row >= b.sample_id.len());
            if exhausted {
                match part.labels.next() {
                    Some(Ok(batch)) => {
                        part.batch = Some(decode_labels(&batch, k, &part.labels_path)?);
                        part.row = 0;
                        continue;
                    }
                    Some(Err(e)) => {
                        return Err(corrupt(&part.labels_path, format!("reading rows: {e}")))
                    }
                    None => {
                        return Err(corrupt(
                            &part.labels_path,
                            format!("labels end inside sample {id} ({done} of {n} positions)"),
                        ))
                    }
                }
            }
            let Some(b) = part.batch.as_ref() else {
                continue;
            };
            let take = (n - done).min(b.sample_id.len() - part.row);
            let (first, last) = (part.row, part.row + take - 1);
            if b.sample_id.value(first) != id
                || b.sample_id.value(last) != id
                || b.position.value(first) as usize != done
                || b.position.value(last) as usize != done + take - 1
            {
                return Err(corrupt(
                    &part.labels_path,
                    format!(
                        "label rows out of step with samples at sample {id} position {done} \
                         (found sample {} position {})",
                        b.sample_id.value(first),
                        b.position.value(first)
                    ),
                ));
            }
            if keep {
                seq.in_loss
                    .extend((first..=last).map(|r| b.in_loss.value(r)));
                seq.topk_ids
                    .extend_from_slice(&b.topk_ids.values()[first * k..(last + 1) * k]);
                seq.topk_logprobs
                    .extend_from_slice(&b.topk_logprobs.values()[first * k..(last + 1) * k]);
            }
            part.row += take;
            done += take;
        }
        Ok(Some(seq))
    }

    /// Cuts a sample into windows of at most `max_positions` positions, dropping windows
    /// without in-loss positions.
    fn windows(&mut self, seq: Sequence) {
        let (n, k, w) = (seq.positions(), self.k, self.max_positions);
        if n <= w {
            if seq.in_loss.iter().any(|&x| x) {
                self.pending.push_back(seq);
            }
            return;
        }
        let mut start = 0;
        while start < n {
            let end = (start + w).min(n);
            if seq.in_loss[start..end].iter().any(|&x| x) {
                self.pending.push_back(Sequence {
                    sample_id: seq.sample_id,
                    tokens: seq.tokens[start..=end].to_vec(),
                    in_loss: seq.in_loss[start..end].to_vec(),
                    topk_ids: seq.topk_ids[start * k..end * k].to_vec(),
                    topk_logprobs: seq.topk_logprobs[start * k..end * k].to_vec(),
                });
            }
            start = end;
        }
    }

    fn advance(&mut self) -> Result<Option<Sequence>> {
        loop {
            if let Some(s) = self.pending.pop_front() {
                return Ok(Some(s));
            }
            if self.part.is_none() && !self.open_next_part()? {
                return Ok(None);
            }
            match self.next_sample()? {
                Some(seq) => {
                    let keep = self
                        .part
                        .as_ref()
                        .and_then(|p| p.samples.get(p.next_sample - 1))
                        .is_some_and(|s| s.keep);
                    if keep && seq.positions() > 0 {
                        self.windows(seq);
                    }
                }
                None => self.part = None,
            }
        }
    }
}

impl Iterator for SequenceReader {
    type Item = Result<Sequence>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.advance() {
            Ok(s) => s.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Batches over epochs: each epoch is one [`SequenceReader`] pass, shuffled through a buffer
/// seeded by `(seed, epoch)`, packed into batches of at most `batch_tokens` padded tokens.
pub struct BatchStream {
    reader: StoreReader,
    opts: DataOptions,
    k: usize,
    epoch: u64,
    sequences: SequenceReader,
    exhausted: bool,
    rng: StdRng,
    buffer: Vec<Sequence>,
    /// Rows of the batch being filled.
    current: Vec<Vec<Sequence>>,
    current_longest: usize,
    epoch_sequences: u64,
    ready: VecDeque<Batch>,
    done: bool,
}

fn epoch_rng(seed: u64, epoch: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

impl BatchStream {
    /// A stream starting at epoch 0.
    pub fn new(reader: StoreReader, opts: DataOptions) -> Result<Self> {
        if opts.batch_tokens == 0 {
            return Err(Error::InvalidArgument(
                "batch tokens must be positive".into(),
            ));
        }
        let mut opts = opts;
        opts.max_positions = opts.max_positions.clamp(1, opts.batch_tokens);
        let k = reader.manifest().k;
        let sequences = SequenceReader::new(reader.clone(), &opts.split, opts.max_positions);
        Ok(BatchStream {
            rng: epoch_rng(opts.seed, 0),
            reader,
            k,
            epoch: 0,
            sequences,
            exhausted: false,
            buffer: Vec::with_capacity(opts.shuffle_buffer.max(1)),
            current: Vec::new(),
            current_longest: 0,
            epoch_sequences: 0,
            ready: VecDeque::new(),
            done: false,
            opts,
        })
    }

    fn next_shuffled(&mut self) -> Option<Result<Sequence>> {
        while !self.exhausted && self.buffer.len() < self.opts.shuffle_buffer.max(1) {
            match self.sequences.next() {
                Some(Ok(s)) => self.buffer.push(s),
                Some(Err(e)) => return Some(Err(e)),
                None => self.exhausted = true,
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let j = self.rng.random_range(0..self.buffer.len());
        Some(Ok(self.buffer.swap_remove(j)))
    }

    fn flush(&mut self) {
        if !self.current.is_empty() {
            let rows: Vec<Vec<&Sequence>> =
                self.current.iter().map(|r| r.iter().collect()).collect();
            let batch = Batch::from_rows(&rows, self.k, self.epoch);
            self.ready.push_back(batch);
            self.current.clear();
            self.current_longest = 0;
        }
    }

    fn push(&mut self, seq: Sequence) {
        let n = seq.positions();
        if self.opts.pack {
            // Rows of `max_positions` tokens, as many as the budget holds.
            let row_cap = self.opts.max_positions;
            let max_rows = (self.opts.batch_tokens / row_cap).max(1);
            let fits_last = self
                .current
                .last()
                .is_some_and(|r| r.iter().map(Sequence::positions).sum::<usize>() + n <= row_cap);
            if fits_last {
                if let Some(row) = self.current.last_mut() {
                    row.push(seq);
                }
                return;
            }
            if self.current.len() >= max_rows {
                self.flush();
            }
            self.current.push(vec![seq]);
            return;
        }
        let longest = self.current_longest.max(n);
        if !self.current.is_empty() && longest * (self.current.len() + 1) > self.opts.batch_tokens {
            self.flush();
        }
        self.current_longest = self.current_longest.max(n);
        self.current.push(vec![seq]);
    }
}

impl Iterator for BatchStream {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(b) = self.ready.pop_front() {
                return Some(Ok(b));
            }
            if self.done {
                return None;
            }
            match self.next_shuffled() {
                Some(Ok(seq)) => {
                    self.epoch_sequences += 1;
                    self.push(seq);
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                None => {
                    self.flush();
                    if self.epoch_sequences == 0 {
                        self.done = true;
                        return Some(Err(Error::NoTrainingData(format!(
                            "{}: no sample of split {:?} has an in-loss position",
                            self.reader.dir().display(),
                            self.opts.split
                        ))));
                    }
                    self.epoch += 1;
                    if self.opts.epochs.is_some_and(|e| self.epoch >= e) {
                        self.done = true;
                        continue;
                    }
                    self.epoch_sequences = 0;
                    self.exhausted = false;
                    self.rng = epoch_rng(self.opts.seed, self.epoch);
                    self.sequences = SequenceReader::new(
                        self.reader.clone(),
                        &self.opts.split,
                        self.opts.max_positions,
                    );
                }
            }
        }
    }
}

/// Runs `stream` on its own thread, `prefetch` batches ahead, behind a bounded channel. The
/// thread stops when the stream ends or the receiver is dropped.
pub fn spawn_prefetch(stream: BatchStream, prefetch: usize) -> Receiver<Result<Batch>> {
    let (tx, rx) = sync_channel(prefetch.max(1));
    std::thread::spawn(move || {
        for item in stream {
            if tx.send(item).is_err() {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::synthetic::{generate, SyntheticConfig};
    use crate::store::WriterOptions;

    fn store(dir: &std::path::Path) -> StoreReader {
        let cfg = SyntheticConfig {
            label_rows: 3000,
            seed: 5,
            vocab_size: 512,
            min_len: 10,
            max_len: 120,
            part_rows: 700,
            valid_fraction: 0.2,
            ..SyntheticConfig::default()
        };
        generate(
            dir,
            &cfg,
            WriterOptions {
                batch_rows: 300,
                row_group_rows: 500,
                ..Default::default()
            },
        )
        .unwrap();
        StoreReader::open(dir).unwrap()
    }

    fn opts(split: &str) -> DataOptions {
        DataOptions {
            split: split.into(),
            batch_tokens: 256,
            max_positions: 64,
            shuffle_buffer: 8,
            seed: 1,
            epochs: Some(1),
            pack: false,
        }
    }

    #[test]
    fn sequences_match_the_labels_table() {
        let tmp = tempfile::tempdir().unwrap();
        let reader = store(&tmp.path().join("s"));
        assert!(reader.manifest().parts.len() >= 3);
        // Every in-loss label row of the train split appears exactly once, with its data.
        let mut expected = std::collections::BTreeMap::new();
        for batch in reader.batches(Table::Labels, None, 1000).unwrap() {
            let batch = batch.unwrap();
            let lb = decode_labels(&batch, 5, std::path::Path::new("x")).unwrap();
            for r in 0..batch.num_rows() {
                if lb.in_loss.value(r) {
                    let key = (lb.sample_id.value(r), lb.position.value(r));
                    expected.insert(key, lb.topk_ids.values()[r * 5..r * 5 + 5].to_vec());
                }
            }
        }
        let mut train_samples = std::collections::BTreeSet::new();
        for batch in reader.batches(Table::Samples, None, 1000).unwrap() {
            let batch = batch.unwrap();
            let ids = batch.column(0).as_primitive::<UInt64Type>();
            let split = batch.column(2).as_string::<i32>();
            for r in 0..batch.num_rows() {
                if split.value(r) == "train" {
                    train_samples.insert(ids.value(r));
                }
            }
        }
        expected.retain(|(s, _), _| train_samples.contains(s));
        let mut seen = 0;
        let mut offsets: std::collections::BTreeMap<u64, u32> = Default::default();
        for seq in SequenceReader::new(reader.clone(), "train", 64) {
            let seq = seq.unwrap();
            assert!(seq.positions() <= 64);
            assert_eq!(seq.tokens.len(), seq.positions() + 1);
            let off = offsets.entry(seq.sample_id).or_insert(0);
            for p in 0..seq.positions() {
                if seq.in_loss[p] {
                    let key = (seq.sample_id, *off + p as u32);
                    assert_eq!(
                        expected.remove(&key).as_deref(),
                        Some(&seq.topk_ids[p * 5..p * 5 + 5]),
                        "{key:?}"
                    );
                    seen += 1;
                }
            }
            *off += seq.positions() as u32;
        }
        assert!(seen > 500);
        assert!(
            expected.is_empty(),
            "{} in-loss rows never seen",
            expected.len()
        );
    }

    #[test]
    fn batches_respect_the_budget_and_are_seeded() {
        let tmp = tempfile::tempdir().unwrap();
        let reader = store(&tmp.path().join("s"));
        let collect = |seed: u64| -> Vec<Batch> {
            let o = DataOptions {
                seed,
                epochs: Some(2),
                ..opts("train")
            };
            BatchStream::new(reader.clone(), o)
                .unwrap()
                .map(|b| b.unwrap())
                .collect()
        };
        let a = collect(1);
        assert_eq!(a, collect(1));
        assert_ne!(a, collect(2));
        assert!(a.iter().any(|b| b.epoch == 1));
        for b in &a {
            assert!(b.rows * b.seq_len <= 256);
            assert_eq!(b.topk_ids.len(), b.loss_positions() * 5);
            for (&row, &t) in b.loss_rows.iter().zip(&b.targets) {
                let (r, p) = (row as usize / b.seq_len, row as usize % b.seq_len);
                assert!(p < b.lengths[r]);
                let _ = t;
            }
        }
        let rx = spawn_prefetch(
            BatchStream::new(
                reader.clone(),
                DataOptions {
                    epochs: Some(2),
                    ..opts("train")
                },
            )
            .unwrap(),
            2,
        );
        let threaded: Vec<Batch> = rx.iter().map(|b| b.unwrap()).collect();
        assert_eq!(threaded, a);
    }

    #[test]
    fn packing_keeps_every_sequence_whole_within_the_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let reader = store(&tmp.path().join("s"));
        let collect = |pack: bool| -> Vec<Batch> {
            let o = DataOptions {
                pack,
                ..opts("train")
            };
            BatchStream::new(reader.clone(), o)
                .unwrap()
                .map(|b| b.unwrap())
                .collect()
        };
        let (padded, packed) = (collect(false), collect(true));
        // Real tokens of every sequence in stream order, and every label in order.
        let flat = |batches: &[Batch]| {
            let mut tokens = Vec::new();
            let mut seq_lens = Vec::new();
            let (mut targets, mut topk) = (Vec::new(), Vec::new());
            for b in batches {
                for r in 0..b.rows {
                    assert_eq!(b.segments[r].iter().sum::<usize>(), b.lengths[r]);
                    let row = &b.input_ids[r * b.seq_len..r * b.seq_len + b.lengths[r]];
                    tokens.extend_from_slice(row);
                    seq_lens.extend_from_slice(&b.segments[r]);
                }
                targets.extend_from_slice(&b.targets);
                topk.extend_from_slice(&b.topk_ids);
            }
            (tokens, seq_lens, targets, topk)
        };
        assert_eq!(flat(&padded), flat(&packed), "same data in the same order");
        let cells = |bs: &[Batch]| bs.iter().map(|b| b.rows * b.seq_len).sum::<usize>();
        // Windows of up to 64 positions, many of them full: packing saves the padding of the
        // shorter ones (3,328 vs 3,818 cells for this store).
        assert!(
            cells(&packed) < cells(&padded) * 9 / 10,
            "packing should need fewer cells: {} vs {}",
            cells(&packed),
            cells(&padded)
        );
        assert!(packed.len() < padded.len());
        assert!(packed
            .iter()
            .any(|b| b.segments.iter().any(|s| s.len() > 1)));
        for b in &packed {
            assert!(
                b.seq_len <= 64 && b.rows <= 256 / 64,
                "{} x {}",
                b.rows,
                b.seq_len
            );
            for (&row, _) in b.loss_rows.iter().zip(&b.targets) {
                let (r, p) = (row as usize / b.seq_len, row as usize % b.seq_len);
                assert!(p < b.lengths[r]);
            }
        }
    }

    #[test]
    fn missing_split_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let reader = store(&tmp.path().join("s"));
        let mut s = BatchStream::new(reader, opts("nonexistent")).unwrap();
        let err = s.next().unwrap().unwrap_err();
        assert!(matches!(err, Error::NoTrainingData(_)), "{err}");
    }
}
