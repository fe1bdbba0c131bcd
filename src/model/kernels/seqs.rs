//! Where the sequences of a batch lie in the rows of its activations, for the attention
//! kernels (the only kernels that look across rows).
//!
//! Images are all the same length, so item `i` is rows `i * seq .. (i + 1) * seq`
//! ([`Seqs::Uniform`]). Captions are not: under the text tower's causal mask, the tokens after a
//! caption's end-of-text token cannot change its pooled output, so the tower stops each caption
//! there and lays them end to end ([`Seqs::Packed`]). A batch of captions padded to its longest
//! then costs what its real tokens cost in every product, norm and activation, not what the
//! longest caption costs times the batch.

use candle_core::{bail, Result};

/// The row offsets of packed sequences: sequence `i` is rows `offsets[i] .. offsets[i + 1]`.
/// Made only through [`Packing::from_lens`], so the offsets start at 0, never decrease and every
/// sequence has at least one row: kernels may rely on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packing {
    offsets: Vec<usize>,
    max_len: usize,
}

impl Packing {
    /// Sequences of these lengths, end to end; errors on an empty list, an empty sequence or
    /// a total that overflows.
    pub fn from_lens(lens: &[usize]) -> Result<Self> {
        if lens.is_empty() {
            bail!("a packed batch needs at least one sequence");
        }
        let mut offsets = Vec::with_capacity(lens.len() + 1);
        offsets.push(0usize);
        let mut total = 0usize;
        for &len in lens {
            if len == 0 {
                bail!("a packed sequence needs at least one row");
            }
            total = match total.checked_add(len) {
                Some(t) => t,
                None => bail!("packed sequences overflow usize"),
            };
            offsets.push(total);
        }
        Ok(Self {
            offsets,
            max_len: lens.iter().copied().max().unwrap_or(0),
        })
    }

    /// `items + 1` offsets, the first 0, the last the number of rows.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

/// A batch's sequences: `batch` of `seq` rows each, or packed end to end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Seqs<'a> {
    Uniform { batch: usize, seq: usize },
    Packed(&'a Packing),
}

impl Seqs<'_> {
    pub fn items(&self) -> usize {
        match self {
            Seqs::Uniform { batch, .. } => *batch,
            Seqs::Packed(p) => p.offsets.len() - 1,
        }
    }

    /// The longest sequence: the stride of per-sequence scratch laid out as if padded.
    pub fn max_len(&self) -> usize {
        match self {
            Seqs::Uniform { seq, .. } => *seq,
            Seqs::Packed(p) => p.max_len,
        }
    }

    /// Every row of every sequence; None if that overflows.
    pub fn rows(&self) -> Option<usize> {
        match self {
            Seqs::Uniform { batch, seq } => batch.checked_mul(*seq),
            Seqs::Packed(p) => p.offsets.last().copied(),
        }
    }

    /// The first row of sequence `item` (`item < items()`).
    pub fn start(&self, item: usize) -> usize {
        match self {
            Seqs::Uniform { seq, .. } => item * seq,
            Seqs::Packed(p) => p.offsets[item],
        }
    }

    /// The rows of sequence `item` (`item < items()`).
    pub fn len(&self, item: usize) -> usize {
        match self {
            Seqs::Uniform { seq, .. } => *seq,
            Seqs::Packed(p) => p.offsets[item + 1] - p.offsets[item],
        }
    }

    /// Whether there are no rows at all.
    pub fn is_empty(&self) -> bool {
        self.rows() == Some(0)
    }

    /// The row of position `pos` in sequence `item`; errors outside the batch.
    pub fn row(&self, item: usize, pos: usize) -> Result<usize> {
        if item >= self.items() || pos >= self.len(item) {
            bail!("row ({item}, {pos}) is outside the batch");
        }
        Ok(self.start(item) + pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rows_follow_the_lengths() -> Result<()> {
        let p = Packing::from_lens(&[3, 1, 5])?;
        let s = Seqs::Packed(&p);
        assert_eq!((s.items(), s.max_len(), s.rows()), (3, 5, Some(9)));
        assert_eq!((s.start(2), s.len(2)), (4, 5));
        assert_eq!(s.row(1, 0)?, 3);
        assert!(s.row(1, 1).is_err() && s.row(3, 0).is_err());
        assert!(Packing::from_lens(&[]).is_err());
        assert!(Packing::from_lens(&[2, 0]).is_err());
        assert!(Packing::from_lens(&[usize::MAX, 1]).is_err());
        let u = Seqs::Uniform { batch: 2, seq: 4 };
        assert_eq!(
            (u.start(1), u.len(1), u.rows(), u.row(1, 3)?),
            (4, 4, Some(8), 7)
        );
        Ok(())
    }
}
