//! What a teacher forward pass attends to: [`KeySpan`] (the keys of one query) and
//! [`AttentionLayout`] (positions and spans of a whole batch: packed sequences, or one prompt
//! shared by several continuations).

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// The keys one query attends to: `shared_start..shared_end` (a prefix it shares with other
/// branches, e.g. a question's prompt) and `own_start..=query` (its own branch). Plain causal
/// attention over a sequence starting at `o` is `{ o, o, o }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpan {
    /// First key of the shared prefix.
    pub shared_start: u32,
    /// One past the last key of the shared prefix (`== shared_start`: none).
    pub shared_end: u32,
    /// First key of the query's own branch (the query itself is its last key).
    pub own_start: u32,
}

impl KeySpan {
    /// Causal attention over a sequence that starts at key `start`.
    pub fn causal(start: u32) -> Self {
        Self {
            shared_start: start,
            shared_end: start,
            own_start: start,
        }
    }

    /// Whether query `q` attends to key `k`.
    pub fn allows(&self, q: u32, k: u32) -> bool {
        (self.shared_start..self.shared_end).contains(&k) || (self.own_start..=q).contains(&k)
    }
}

/// Per-token RoPE positions and key spans of a `[batch, seq]` batch (row-major, `batch * seq`
/// entries each): several sequences per row, or a prompt shared by several continuations
/// (each continuation attends to the prompt and to itself, its positions following the
/// prompt's), in one forward pass.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttentionLayout {
    /// RoPE position of every token.
    pub positions: Vec<u32>,
    /// Keys of every query, as indices into its own row.
    pub spans: Vec<KeySpan>,
}

impl AttentionLayout {
    pub(super) fn check(&self, b: usize, s: usize, context: usize) -> Result<()> {
        let n = b * s;
        if self.positions.len() != n || self.spans.len() != n {
            return Err(Error::InvalidArgument(format!(
                "attention layout of {} positions and {} spans for a [{b}, {s}] batch",
                self.positions.len(),
                self.spans.len()
            )));
        }
        if let Some(&p) = self.positions.iter().find(|&&p| p as usize >= context) {
            return Err(Error::InvalidArgument(format!(
                "position {p} exceeds the model's context of {context}"
            )));
        }
        for (i, sp) in self.spans.iter().enumerate() {
            let q = (i % s) as u32;
            let shared_ok = sp.shared_start <= sp.shared_end && sp.shared_end <= q;
            let overlap = sp.shared_start < sp.shared_end && sp.own_start < sp.shared_end;
            if !shared_ok || sp.own_start > q || overlap {
                return Err(Error::InvalidArgument(format!(
                    "key span {sp:?} of query {q}: the shared keys must end at or before the \
                     query, the own keys start at or before it, and the two must not overlap"
                )));
            }
        }
        Ok(())
    }

    /// The additive mask `[b, s, s]` (0 where allowed, -inf elsewhere) for non-CPU devices.
    pub(super) fn additive_mask(&self, b: usize, s: usize, device: &Device) -> Result<Tensor> {
        let mut data = vec![f32::NEG_INFINITY; b * s * s];
        for (i, sp) in self.spans.iter().enumerate() {
            let q = (i % s) as u32;
            for k in 0..s as u32 {
                if sp.allows(q, k) {
                    data[i * s + k as usize] = 0.0;
                }
            }
        }
        Ok(Tensor::from_vec(data, (b, s, s), device)?)
    }
}
