//! The text tower: token + position embeddings, a causal pre-LN encoder, the final layer norm,
//! pooling at the end-of-text token and the text projection.

use std::sync::Arc;

use candle_core::{Device, Result, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};

use super::config::TextConfig;
use super::kernels::seqs::Packing;
use super::layers::{Encoder, EncoderShape, LayerNorm, Linear, Mode};
use super::ops::packed::PackedSeqs;
use super::policy::Kernels;

/// A tokenized batch ready for the tower: ids padded to the longest row, the position whose
/// hidden state each row is pooled from, and the same rows packed.
#[derive(Debug, Clone)]
pub struct TextBatch {
    /// One position per row, computed on the host from the ids (no device round-trip).
    pub pool_positions: Vec<usize>,
    /// The padded ids, `[batch, seq]` row-major, on the host: the GPU path's embedding op takes
    /// them from here (checked and uploaded with its launch); the other paths upload them as
    /// [`TextBatch::input_ids`] when they need them, so no path uploads what it does not read.
    host_ids: Arc<[u32]>,
    seq: usize,
    device: Device,
    packed: PackedIds,
}

/// Each row only up to its pooled token, the rows end to end: under the causal mask the tokens
/// after it cannot change the pooled output, so a tower whose kernels take packed sequences
/// ([`Encoder::takes_packed`]) computes these alone.
#[derive(Debug, Clone)]
struct PackedIds {
    /// The rows' ids, on the host.
    host_ids: Arc<[u32]>,
    /// Each row's position in its caption, on the host (shared with the fused embedding ops,
    /// not copied per pass).
    host_positions: Arc<[u32]>,
    seqs: Arc<PackedSeqs>,
}

impl PackedIds {
    /// The ids as a `[rows]` u32 tensor on `device`.
    fn ids(&self, device: &Device) -> Result<Tensor> {
        Tensor::new(&self.host_ids[..], device)
    }

    /// The positions as a `[rows]` u32 tensor on `device`.
    fn positions(&self, device: &Device) -> Result<Tensor> {
        Tensor::new(&self.host_positions[..], device)
    }
}

impl TextBatch {
    /// Builds the batch from already padded rows; `pool_positions` follow transformers' rule for
    /// the config's `eos_token_id` (see [`pool_position`]).
    pub fn new(rows: &[Vec<u32>], eos_token_id: u32, device: &Device) -> Result<Self> {
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        if rows.is_empty() || seq == 0 {
            candle_core::bail!("a text batch needs at least one non-empty row");
        }
        if rows.iter().any(|r| r.len() != seq) {
            candle_core::bail!("text batch rows must be padded to the same length");
        }
        let host_ids: Arc<[u32]> = rows.iter().flatten().copied().collect();
        let pool_positions: Vec<usize> = rows
            .iter()
            .map(|r| pool_position(r, eos_token_id))
            .collect();
        let lens: Vec<usize> = pool_positions.iter().map(|p| p + 1).collect();
        let ids: Arc<[u32]> = rows
            .iter()
            .zip(&lens)
            .flat_map(|(r, &n)| r[..n].iter().copied())
            .collect();
        let host_positions: Arc<[u32]> = lens.iter().flat_map(|&n| 0..n as u32).collect();
        let packed = PackedIds {
            host_ids: ids,
            host_positions,
            seqs: Arc::new(PackedSeqs::new(Packing::from_lens(&lens)?)),
        };
        Ok(Self {
            pool_positions,
            host_ids,
            seq,
            device: device.clone(),
            packed,
        })
    }

    /// Rows and the padded length.
    pub fn dims(&self) -> (usize, usize) {
        (self.pool_positions.len(), self.seq)
    }

    /// The padded ids as a `[batch, seq]` u32 tensor on the batch's device (uploaded per call).
    pub fn input_ids(&self) -> Result<Tensor> {
        Tensor::from_slice(&self.host_ids, self.dims(), &self.device)
    }
}

/// Where transformers' CLIPTextTransformer pools a row. With the legacy `eos_token_id == 2` of the
/// OpenAI configs it takes the arg-max id (first maximum, like torch); otherwise the first token
/// equal to `eos_token_id`, falling back to the last position.
pub fn pool_position(ids: &[u32], eos_token_id: u32) -> usize {
    if eos_token_id == 2 {
        let mut best = 0;
        for (i, &id) in ids.iter().enumerate() {
            if id > ids[best] {
                best = i;
            }
        }
        best
    } else {
        ids.iter()
            .position(|&id| id == eos_token_id)
            .unwrap_or(ids.len().saturating_sub(1))
    }
}

/// The token embedding table: loaded, or (for a serving process) read row by row from the
/// checkpoint file, so the 49,408-row table does not sit in memory when a batch needs a few
/// hundred rows (the rows come from the page cache; ~100 MB less resident for ViT-B/32).
#[derive(Debug, Clone)]
enum TokenEmbedding {
    Loaded(Embedding),
    FileRows(FileRows),
}

/// An f32 `[vocab, hidden]` table in a file, read with positioned reads.
#[derive(Debug, Clone)]
struct FileRows {
    file: std::sync::Arc<std::fs::File>,
    path: std::path::PathBuf,
    start: u64,
    vocab: usize,
    hidden: usize,
}

impl FileRows {
    /// The rows of `ids`, concatenated; each distinct row read once.
    fn gather(&self, ids: &[u32]) -> Result<Vec<f32>> {
        use std::os::unix::fs::FileExt;
        let row_bytes = self.hidden * 4;
        let mut cache: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
        let mut rows: Vec<u8> = Vec::new();
        let mut order = Vec::with_capacity(ids.len());
        for &id in ids {
            if id as usize >= self.vocab {
                candle_core::bail!("token id {id} is outside the vocabulary of {}", self.vocab);
            }
            let slot = match cache.get(&id) {
                Some(&s) => s,
                None => {
                    let s = cache.len();
                    rows.resize((s + 1) * row_bytes, 0);
                    self.file
                        .read_exact_at(
                            &mut rows[s * row_bytes..],
                            self.start + id as u64 * row_bytes as u64,
                        )
                        .map_err(|e| {
                            candle_core::Error::Msg(format!(
                                "{}: reading token rows: {e}",
                                self.path.display()
                            ))
                        })?;
                    cache.insert(id, s);
                    s
                }
            };
            order.push(slot);
        }
        let mut out = Vec::with_capacity(ids.len() * self.hidden);
        for s in order {
            out.extend(
                rows[s * row_bytes..(s + 1) * row_bytes]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(out)
    }
}

/// `text_model.*` plus `text_projection`.
#[derive(Debug, Clone)]
pub struct TextTower {
    token_embedding: TokenEmbedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    projection: Linear,
    config: TextConfig,
    kernels: Kernels,
}

impl TextTower {
    /// Forgets every copy made of the weights (AMX packing of every linear layer, the
    /// encoder's stacked projections), in this clone only: for weights changed in place since.
    pub(crate) fn forget_derived(&mut self) {
        self.encoder.forget_stacked();
        self.linears_mut()
            .into_iter()
            .for_each(Linear::forget_packed);
    }

    /// The encoder's separate q, k and v weights, for serving on the fused GPU path
    /// ([`super::layers::Attention::release_stacked`]); the bytes released.
    pub(crate) fn release_stacked(&mut self) -> Result<usize> {
        self.encoder.release_stacked()
    }

    /// Every linear layer, for [`Linear::release_packed`].
    pub(crate) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = self.encoder.linears_mut();
        out.push(&mut self.projection);
        out
    }

    /// `vb` is rooted at the checkpoint's top level (where `text_model.` and `text_projection.` live).
    pub fn new(
        vb: VarBuilder,
        c: &TextConfig,
        projection_dim: usize,
        kernels: Kernels,
    ) -> Result<Self> {
        let m = vb.pp("text_model");
        let e = m.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(c.vocab_size, c.hidden_size, e.pp("token_embedding"))?;
        let position_embedding = e
            .pp("position_embedding")
            .get((c.max_position_embeddings, c.hidden_size), "weight")?;
        let shape = EncoderShape::of_text(c);
        Ok(Self {
            token_embedding: TokenEmbedding::Loaded(token_embedding),
            position_embedding,
            encoder: Encoder::new(m.pp("encoder"), shape, kernels)?,
            final_layer_norm: LayerNorm::new(
                m.pp("final_layer_norm"),
                c.hidden_size,
                c.layer_norm_eps,
                kernels,
            )?,
            projection: Linear::new(
                vb.pp("text_projection"),
                c.hidden_size,
                projection_dim,
                false,
                kernels,
            )?,
            config: c.clone(),
            kernels,
        })
    }

    /// For serving only: reads token embedding rows from the checkpoint at `loc` instead of
    /// keeping the table in memory. Returns the bytes released; 0 (nothing changes) unless the
    /// table is f32 on the CPU and the file holds exactly it.
    pub fn serve_token_rows_from_file(
        &mut self,
        loc: &super::load::TensorLocation,
    ) -> Result<usize> {
        let TokenEmbedding::Loaded(e) = &self.token_embedding else {
            return Ok(0);
        };
        let table = e.embeddings();
        let (vocab, hidden) = table.dims2()?;
        if !table.device().is_cpu()
            || table.dtype() != candle_core::DType::F32
            || loc.dtype != candle_core::DType::F32
            || loc.shape != [vocab, hidden]
        {
            return Ok(0);
        }
        let file = std::fs::File::open(&loc.path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", loc.path.display())))?;
        let rows = FileRows {
            file: std::sync::Arc::new(file),
            path: loc.path.clone(),
            start: loc.range.start,
            vocab,
            hidden,
        };
        // The file must still hold the loaded values (it could have been replaced since).
        let probe: Vec<u32> = [0, vocab / 2, vocab - 1]
            .iter()
            .map(|&i| i as u32)
            .collect();
        let from_file = rows.gather(&probe)?;
        let ids = Tensor::new(probe.as_slice(), table.device())?;
        let loaded = table
            .index_select(&ids, 0)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if from_file != loaded {
            return Ok(0);
        }
        let bytes = vocab * hidden * 4;
        self.token_embedding = TokenEmbedding::FileRows(rows);
        Ok(bytes)
    }

    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// The projected (not normalised) text features, `[batch, projection_dim]`.
    pub fn forward(&self, batch: &TextBatch, mode: Mode) -> Result<Tensor> {
        self.forward_modes(batch, mode, mode)
    }

    /// [`TextTower::forward`] with the tower (embeddings, encoder, final norm) in `body` mode
    /// and the projection in `head` mode: training with a frozen tower runs its body through
    /// the inference kernels, which keep no graph.
    pub fn forward_modes(&self, batch: &TextBatch, body: Mode, head: Mode) -> Result<Tensor> {
        let mode = body;
        let (_, t) = batch.dims();
        if t > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence of {t} tokens is longer than the model's {} positions",
                self.config.max_position_embeddings
            );
        }
        let packed = self.encoder.takes_packed().then_some(&batch.packed);
        let x = match packed {
            Some(p) => self.embed_packed(p, &batch.device, mode)?,
            None => self.embed_padded(batch, t, mode)?,
        };
        // Layer norm is per position, so normalising only the pooled rows equals transformers'
        // normalise-everything-then-pool, at a fraction of the cost.
        let rows: Vec<(usize, usize)> = batch.pool_positions.iter().copied().enumerate().collect();
        let seqs = packed.map(|p| &p.seqs);
        let pooled = self.encoder.forward_pooled(&x, true, &rows, seqs, mode)?;
        let pooled = self.final_layer_norm.forward(&pooled, mode)?;
        self.projection.forward_t(&pooled, head)
    }

    /// Token and position embeddings of the padded ids `[batch, t]`: `[batch, t, hidden]`.
    fn embed_padded(&self, batch: &TextBatch, t: usize, mode: Mode) -> Result<Tensor> {
        let (b, _) = batch.dims();
        let positions = || self.position_embedding.narrow(0, 0, t);
        match &self.token_embedding {
            TokenEmbedding::Loaded(e) if self.kernels.fused_gpu && self.kernels.embed => {
                let at: Arc<[u32]> = (0..b).flat_map(|_| 0..t as u32).collect();
                self.embed_gpu_path(e, batch.host_ids.clone(), at)?
                    .reshape((b, t, self.config.hidden_size))
            }
            TokenEmbedding::Loaded(e) if self.fused_embedding(e, mode) => {
                // Token and position embeddings in one op (see `train_embed`).
                let op = super::train_embed::TokenEmbedOp {
                    positions: self.position_embedding.clone(),
                    row_positions: None,
                };
                e.embeddings().apply_op2(&batch.input_ids()?, op)
            }
            TokenEmbedding::Loaded(e) => {
                e.forward(&batch.input_ids()?)?.broadcast_add(&positions()?)
            }
            TokenEmbedding::FileRows(rows) => {
                Self::refuse_training_from_file(mode)?;
                let data = rows.gather(&batch.host_ids)?;
                Tensor::from_vec(data, (b, t, rows.hidden), &batch.device)?
                    .broadcast_add(&positions()?)
            }
        }
    }

    /// Token and position embeddings of the packed rows: `[rows, hidden]`.
    fn embed_packed(&self, p: &PackedIds, device: &Device, mode: Mode) -> Result<Tensor> {
        match &self.token_embedding {
            TokenEmbedding::Loaded(e) if self.fused_embedding(e, mode) => {
                let op = super::train_embed::TokenEmbedOp {
                    positions: self.position_embedding.clone(),
                    row_positions: Some(p.host_positions.clone()),
                };
                e.embeddings().apply_op2(&p.ids(device)?, op)
            }
            TokenEmbedding::Loaded(e) if self.kernels.fused_gpu && self.kernels.embed => {
                self.embed_gpu_path(e, p.host_ids.clone(), p.host_positions.clone())
            }
            TokenEmbedding::Loaded(e) => {
                e.forward(&p.ids(device)?)?
                    + self
                        .position_embedding
                        .index_select(&p.positions(device)?, 0)?
            }
            TokenEmbedding::FileRows(rows) => {
                Self::refuse_training_from_file(mode)?;
                let data = rows.gather(&p.host_ids)?;
                Tensor::from_vec(data, (p.host_ids.len(), rows.hidden), device)?
                    + self
                        .position_embedding
                        .index_select(&p.positions(device)?, 0)?
            }
        }
    }

    /// Token and position embeddings of `ids` at `positions` as the GPU path's one op (see
    /// [`super::ops::embed`]), in training and inference: `[rows, hidden]`.
    fn embed_gpu_path(
        &self,
        e: &Embedding,
        ids: Arc<[u32]>,
        positions: Arc<[u32]>,
    ) -> Result<Tensor> {
        let op = super::ops::embed::TokenPositions { ids, positions };
        e.embeddings().apply_op2(&self.position_embedding, op)
    }

    /// Whether training embeds through the fused op (see `train_embed`).
    fn fused_embedding(&self, e: &Embedding, mode: Mode) -> bool {
        mode == Mode::Train
            && self.kernels.cpu_train_blocks()
            && super::train_embed::applies(&[e.embeddings(), &self.position_embedding])
    }

    fn refuse_training_from_file(mode: Mode) -> Result<()> {
        if mode == Mode::Train {
            candle_core::bail!("a model serving token rows from its file cannot be trained");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_rules() {
        let ids = [49406, 320, 1929, 49407, 49407, 49407];
        assert_eq!(pool_position(&ids, 2), 3);
        assert_eq!(pool_position(&ids, 49407), 3);
        assert_eq!(pool_position(&[49406, 5, 6], 49407), 2);
    }
}
