//! CLIP's byte-level BPE through the `tokenizers` crate (pure Rust build, no network).
//!
//! Rows are `<|startoftext|> ... <|endoftext|>`, truncated so that at most the model's context
//! (77) tokens remain with end-of-text still last, and padded only to the longest row of a batch
//! with the end-of-text id, as transformers' `CLIPTokenizerFast` pads.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::model::ModelError;

/// Default cap on one text's size in bytes before tokenization; anything longer is rejected
/// rather than tokenized, since only the first 77 tokens would be used anyway.
pub const DEFAULT_MAX_TEXT_BYTES: usize = 1 << 20;

/// A loaded CLIP tokenizer with its truncation and padding rules. Clones share the vocabulary:
/// every request takes one, and a deep copy of CLIP's BPE tables (about 10 MB) per request in
/// flight was most of a text-serving executor's memory growth.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: std::sync::Arc<Tokenizer>,
    context_length: usize,
    pad_id: u32,
    max_text_bytes: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("context_length", &self.context_length)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// Loads `tokenizer.json`; `context_length` is the text tower's `max_position_embeddings`.
    pub fn from_file(path: &Path, context_length: usize) -> Result<Self, ModelError> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            msg: format!("cannot load {}: {e}", path.display()),
        })?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: context_length,
                strategy: TruncationStrategy::LongestFirst,
                direction: TruncationDirection::Right,
                stride: 0,
            }))
            .map_err(|e| ModelError::Tokenizer { msg: e.to_string() })?;
        inner.with_padding(None);
        let pad_id = inner
            .token_to_id("<|endoftext|>")
            .ok_or_else(|| ModelError::Tokenizer {
                msg: format!(
                    "{} has no <|endoftext|> token; is it a CLIP tokenizer?",
                    path.display()
                ),
            })?;
        Ok(Self {
            inner: std::sync::Arc::new(inner),
            context_length,
            pad_id,
            max_text_bytes: DEFAULT_MAX_TEXT_BYTES,
        })
    }

    pub fn with_max_text_bytes(mut self, max: usize) -> Self {
        self.max_text_bytes = max;
        self
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// The id rows are padded with (`<|endoftext|>`).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Token ids of one text, specials included, at most `context_length` long.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        if text.len() > self.max_text_bytes {
            return Err(ModelError::InvalidInput {
                msg: format!(
                    "text of {} bytes is over the limit of {} bytes",
                    text.len(),
                    self.max_text_bytes
                ),
            });
        }
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer {
                msg: format!("cannot tokenize text: {e}"),
            })?;
        let mut ids = enc.get_ids().to_vec();
        // Truncation keeps room for the specials, so the last id is end-of-text; make sure of it
        // even for tokenizers whose post-processor behaves differently.
        if ids.len() > self.context_length {
            ids.truncate(self.context_length);
        }
        if ids.len() == self.context_length {
            if let Some(last) = ids.last_mut() {
                *last = self.pad_id;
            }
        }
        Ok(ids)
    }

    /// Tokenizes each text and pads every row to the longest one.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>, ModelError> {
        let rows = texts
            .iter()
            .map(|t| self.encode(t.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pad_rows(rows, self.pad_id))
    }
}

/// Pads rows to the longest with `pad_id`.
pub fn pad_rows(mut rows: Vec<Vec<u32>>, pad_id: u32) -> Vec<Vec<u32>> {
    let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
    for r in &mut rows {
        r.resize(longest, pad_id);
    }
    rows
}
