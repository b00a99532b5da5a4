//! The join of each sample with its label rows, in store order, checked row by row to be
//! in step (every label row of a sample present, contiguous, positions counting from 0, and
//! no label row left over).

use std::path::PathBuf;

use super::decode::{corrupt, LabelColumn, LabelRows, SampleColumn, SampleRow};
use super::reader::StoreReader;
use super::rows::{next_or_stop, LabelRowIter};
use crate::error::Result;

impl StoreReader {
    /// Each sample joined with its label rows, in store order. Samples for which `keep`
    /// is false are passed over (their label rows are still read, to stay in step). The
    /// join always reads `sample_id` and `position` of the labels to check that the rows of
    /// each sample are there, contiguous and in order; `columns` adds to them.
    pub fn labelled_samples<F>(&self, columns: &[LabelColumn], keep: F) -> LabelledSamples<F>
    where
        F: FnMut(&SampleRow) -> bool,
    {
        self.part_labelled_samples(0..usize::MAX, columns, keep)
    }

    /// [`Self::labelled_samples`] over the committed parts in `parts` (indices into the
    /// manifest's list).
    pub fn part_labelled_samples<F>(
        &self,
        parts: std::ops::Range<usize>,
        columns: &[LabelColumn],
        keep: F,
    ) -> LabelledSamples<F>
    where
        F: FnMut(&SampleRow) -> bool,
    {
        let mut label_columns = vec![LabelColumn::SampleId, LabelColumn::Position];
        for &c in columns {
            if !label_columns.contains(&c) {
                label_columns.push(c);
            }
        }
        LabelledSamples {
            reader: self.clone(),
            columns: label_columns,
            keep,
            next_part: parts.start,
            end_part: parts.end,
            part: None,
            failed: false,
        }
    }
}

/// A sample and its label rows.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledSample {
    pub sample: SampleRow,
    /// The sample's `num_positions` label rows, position 0 first.
    pub labels: LabelRows,
}

struct JoinPart {
    samples_path: PathBuf,
    samples: std::vec::IntoIter<SampleRow>,
    labels: LabelRowIter,
    batch: Option<LabelRows>,
    row: usize,
}

/// Iterator of [`StoreReader::labelled_samples`].
pub struct LabelledSamples<F> {
    reader: StoreReader,
    columns: Vec<LabelColumn>,
    keep: F,
    next_part: usize,
    end_part: usize,
    part: Option<JoinPart>,
    failed: bool,
}

impl<F: FnMut(&SampleRow) -> bool> LabelledSamples<F> {
    fn open_next_part(&mut self) -> Result<bool> {
        let i = self.next_part;
        if i >= self.end_part {
            return Ok(false);
        }
        let Some(entry) = self.reader.manifest().parts.get(i) else {
            return Ok(false);
        };
        let samples_path = self.reader.dir().join(&entry.samples.file);
        self.next_part += 1;
        let samples = self
            .reader
            .part_sample_rows(i..i + 1, &SampleColumn::ALL)
            .collect::<Result<Vec<_>>>()?;
        self.part = Some(JoinPart {
            samples_path,
            samples: samples.into_iter(),
            labels: self.reader.part_label_rows(i..i + 1, &self.columns, 8192),
            batch: None,
            row: 0,
        });
        Ok(true)
    }

    /// The next sample of the open part with its labels.
    fn next_in_part(&mut self) -> Result<Step> {
        let Some(part) = self.part.as_mut() else {
            return Ok(Step::PartDone);
        };
        let Some(sample) = part.samples.next() else {
            if let Some(extra) = part.labels.next() {
                let extra = extra?;
                let row = extra.first_row;
                return Err(corrupt(
                    &extra.path,
                    row,
                    "label rows after the last sample of the part",
                ));
            }
            if let Some(b) = part.batch.as_ref().filter(|b| part.row < b.len()) {
                return Err(corrupt(
                    &b.path,
                    b.first_row + part.row as u64,
                    format!(
                        "label rows of sample {} after the last sample of the part",
                        b.sample_id[part.row]
                    ),
                ));
            }
            return Ok(Step::PartDone);
        };
        let keep = (self.keep)(&sample);
        let (id, n) = (sample.sample_id, sample.num_positions as usize);
        if sample.input_ids.len() != n + 1 {
            return Err(corrupt(
                &part.samples_path,
                sample.row,
                format!(
                    "sample {id}: {} input ids but num_positions {n}",
                    sample.input_ids.len()
                ),
            ));
        }
        let k = self.reader.manifest().k;
        let mut labels = LabelRows {
            k,
            ..LabelRows::default()
        };
        let mut done = 0;
        while done < n {
            if part.batch.as_ref().is_none_or(|b| part.row >= b.len()) {
                match part.labels.next() {
                    Some(batch) => {
                        part.batch = Some(batch?);
                        part.row = 0;
                        continue;
                    }
                    None => {
                        return Err(corrupt(
                            &part.samples_path,
                            sample.row,
                            format!("labels end inside sample {id} ({done} of {n} positions)"),
                        ))
                    }
                }
            }
            let Some(b) = part.batch.as_ref() else {
                continue;
            };
            let take = (n - done).min(b.len() - part.row);
            let range = part.row..part.row + take;
            if labels.path.as_os_str().is_empty() {
                labels.path.clone_from(&b.path);
                labels.first_row = b.first_row + part.row as u64;
            }
            // Every row of the run must belong to this sample, positions counting up.
            if let Some(bad) = range
                .clone()
                .find(|&r| b.sample_id[r] != id || b.position[r] as usize != done + (r - part.row))
            {
                return Err(corrupt(
                    &b.path,
                    b.first_row + bad as u64,
                    format!(
                        "label rows out of step with samples: expected sample {id} position {}, \
                         found sample {} position {}",
                        done + (bad - part.row),
                        b.sample_id[bad],
                        b.position[bad]
                    ),
                ));
            }
            if keep {
                labels.extend_from(b, range);
            }
            part.row += take;
            done += take;
        }
        Ok(if keep {
            Step::Sample(Box::new(LabelledSample { sample, labels }))
        } else {
            Step::Skipped
        })
    }

    fn advance(&mut self) -> Result<Option<LabelledSample>> {
        loop {
            if self.part.is_none() && !self.open_next_part()? {
                return Ok(None);
            }
            match self.next_in_part()? {
                Step::Sample(s) => return Ok(Some(*s)),
                Step::Skipped => {}
                Step::PartDone => self.part = None,
            }
        }
    }
}

/// What the join found next in a part.
enum Step {
    Sample(Box<LabelledSample>),
    Skipped,
    PartDone,
}

impl<F: FnMut(&SampleRow) -> bool> Iterator for LabelledSamples<F> {
    type Item = Result<LabelledSample>;

    fn next(&mut self) -> Option<Self::Item> {
        next_or_stop!(self)
    }
}
