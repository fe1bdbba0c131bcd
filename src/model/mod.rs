//! CLIP itself, shared by serving and training.
//!
//! [`config`] reads `config.json`; [`layers`], [`text`], [`vision`] and [`clip`] are the one model
//! definition (differentiable in [`Mode::Train`], fused kernels in [`Mode::Inference`]); [`load`]
//! finds checkpoints; [`preprocess`] ([`tokenizer`], [`image`]) turns raw inputs into tower
//! inputs and [`upload`] moves image batches to the device; [`device`] picks where and in which
//! precision to run, and [`policy`] which kernels a loaded model runs. The kernels live apart, per device, in
//! [`kernels`] ([`cpu`], [`amx`], `cuda`); the fused custom ops that run them, inference and
//! training, in [`ops`]. [`Encoder`] ties them into the one object the
//! CLI, the executor and the evaluator use to turn texts and images into embeddings.

pub mod backbones;
pub mod clip;
pub mod config;
pub mod device;
pub mod kernels;
pub mod layers;
pub mod load;
pub mod ops;
pub mod policy;
pub mod preprocess;
pub mod text;
pub mod upload;
pub mod vision;

// The kernels, ops and preprocessing by their short names, as the rest of the crate uses them.
pub use kernels::{amx, cpu};
pub use ops::{train_block, train_embed, train_ops};
pub use preprocess::{image, tokenizer};

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use clip::{Clip, Towers};
pub use config::ClipConfig;
pub use image::{ImageConfig, ImagePreprocessor};
pub use layers::Mode;
pub use load::ModelFiles;
pub use text::TextBatch;
pub use tokenizer::ClipTokenizer;

/// Everything that can go wrong while loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid configuration: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("model {what} {msg}")]
    NotFound { what: String, msg: String },
    #[error("hub repo {repo}: {msg}")]
    Hub { repo: String, msg: String },
    #[error("cannot read weights from {files}: {msg}")]
    Weights { files: String, msg: String },
    #[error("tokenizer: {msg}")]
    Tokenizer { msg: String },
    #[error("image: {msg}")]
    Image { msg: String },
    #[error("invalid input: {msg}")]
    InvalidInput { msg: String },
    #[error("{0} is not available in this model (it was loaded with --select-model {1})")]
    TowerMissing(&'static str, &'static str),
    #[error("model computation failed: {}", candle_message(.0))]
    Compute(#[from] candle_core::Error),
}

/// A candle error's message without the backtrace candle appends to it under `RUST_BACKTRACE`
/// (`Error::WithBacktrace`): the reason, not the frames, is what a caller can act on.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_message(inner))
        }
        other => other.to_string(),
    }
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn weights(files: &[PathBuf], e: candle_core::Error) -> Self {
        let files = files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Self::Weights {
            files,
            msg: candle_message(&e),
        }
    }
}

/// The default backbone, as in Finetuner and clip-as-service.
pub const DEFAULT_MODEL: &str = "openai/clip-vit-base-patch32";

/// How to load: which towers, where, in which precision, with which input limits.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub towers: Towers,
    pub device: Device,
    pub dtype: DType,
    pub max_image_pixels: u64,
    pub max_text_bytes: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            towers: Towers::ALL,
            device: Device::Cpu,
            dtype: DType::F32,
            max_image_pixels: image::DEFAULT_MAX_PIXELS,
            max_text_bytes: tokenizer::DEFAULT_MAX_TEXT_BYTES,
        }
    }
}

/// A loaded model with its input processing: the one thing that turns texts and images into
/// embeddings, for `encode`, `bench`, the executor and the evaluator alike.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub clip: Clip,
    pub tokenizer: Option<ClipTokenizer>,
    pub images: Option<ImagePreprocessor>,
    pub device: Device,
    pub dtype: DType,
    pub source: String,
    /// Where the token embedding table is stored, for [`Encoder::release_for_serving`].
    token_rows: Option<load::TensorLocation>,
    /// Keeps an unpacked artifact zip on disk while the model may read from it.
    _unpacked: Option<std::sync::Arc<tempfile::TempDir>>,
    /// The kernels chosen at load (None for an encoder over weights being trained).
    pub kernels: Option<policy::KernelPolicy>,
    /// How image batches reach the device.
    uploads: upload::PixelUpload,
}

impl Encoder {
    pub fn load(files: &ModelFiles, opts: &LoadOptions) -> Result<Self, ModelError> {
        let config = ClipConfig::from_file(&files.config)?;
        let kernels = policy::KernelPolicy::decide(&opts.device, opts.dtype, &config);
        tracing::info!("{}: {kernels}", files.source);
        let vb = files.var_builder(opts.towers, opts.dtype, &opts.device)?;
        let clip = Clip::new(vb, &config, opts.towers, kernels.kernels).map_err(|e| {
            ModelError::Weights {
                files: files.source.clone(),
                msg: candle_message(&e),
            }
        })?;
        let tokenizer = match (&clip.text, &files.tokenizer) {
            (Some(t), Some(p)) => Some(
                ClipTokenizer::from_file(p, t.config().max_position_embeddings)?
                    .with_max_text_bytes(opts.max_text_bytes),
            ),
            (Some(_), None) => {
                return Err(ModelError::NotFound {
                    what: files.source.clone(),
                    msg: "has no tokenizer.json, which the text tower needs".into(),
                })
            }
            (None, _) => None,
        };
        let images = match (&clip.vision, &files.preprocessor) {
            (Some(_), p) => {
                let cfg = match p {
                    Some(p) => ImageConfig::from_file(p)?,
                    None => ImageConfig::default(),
                };
                Some(ImagePreprocessor::new(cfg).with_max_pixels(opts.max_image_pixels))
            }
            (None, _) => None,
        };
        let token_rows = match &clip.text {
            Some(_) => files.tensor_location("text_model.embeddings.token_embedding.weight"),
            None => None,
        };
        Ok(Self {
            clip,
            tokenizer,
            images,
            device: opts.device.clone(),
            dtype: opts.dtype,
            source: files.source.clone(),
            token_rows,
            _unpacked: files.unpacked.clone(),
            uploads: upload::PixelUpload::default(),
            kernels: Some(kernels),
        })
    }

    /// An encoder over weights already in memory (the model being trained, evaluated between
    /// epochs); f32, both towers as `clip` has them.
    pub fn from_parts(
        clip: Clip,
        tokenizer: Option<ClipTokenizer>,
        images: Option<ImagePreprocessor>,
        device: Device,
        source: &str,
    ) -> Self {
        Self {
            clip,
            tokenizer,
            images,
            device,
            dtype: DType::F32,
            source: source.to_string(),
            token_rows: None,
            _unpacked: None,
            uploads: upload::PixelUpload::default(),
            kernels: None,
        }
    }

    /// For a process that only serves: weights packed for AMX replace their f32 copies, and the
    /// token embedding table is read row by row from the checkpoint file instead of memory.
    /// Returns the bytes released. The model cannot be trained afterwards.
    pub fn release_for_serving(&mut self) -> Result<usize, ModelError> {
        let mut released = self.clip.release_packed_weights()?;
        if let (Some(text), Some(loc)) = (&mut self.clip.text, &self.token_rows) {
            released += text.serve_token_rows_from_file(loc)?;
        }
        Ok(released)
    }

    pub fn output_dim(&self) -> usize {
        self.clip.output_dim()
    }

    pub fn tokenizer(&self) -> Result<&ClipTokenizer, ModelError> {
        self.tokenizer
            .as_ref()
            .ok_or(ModelError::TowerMissing("the text tower", "clip-vision"))
    }

    pub fn image_preprocessor(&self) -> Result<&ImagePreprocessor, ModelError> {
        self.images
            .as_ref()
            .ok_or(ModelError::TowerMissing("the vision tower", "clip-text"))
    }

    /// Text tower end-of-text rule, for building batches from ids.
    pub fn eos_token_id(&self) -> Result<u32, ModelError> {
        self.clip
            .text
            .as_ref()
            .map(|t| t.config().eos_token_id)
            .ok_or(ModelError::TowerMissing("the text tower", "clip-vision"))
    }

    /// Embeddings of already tokenized rows (padded to the same length).
    pub fn embed_token_rows(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.embed_text_batch(&self.text_batch(rows)?)
    }

    /// Tokenized rows (padded to the same length) as a batch on the model's device.
    pub fn text_batch(&self, rows: &[Vec<u32>]) -> Result<TextBatch, ModelError> {
        Ok(TextBatch::new(rows, self.eos_token_id()?, &self.device)?)
    }

    /// Embeddings of a batch already on the device (the model's work alone: `bench`).
    pub fn embed_text_batch(&self, batch: &TextBatch) -> Result<Vec<Vec<f32>>, ModelError> {
        let features = self.clip.text_features(batch, Mode::Inference)?;
        Ok(features.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }

    /// Embeddings of texts, in order, as one batch.
    pub fn embed_texts<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>, ModelError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self.tokenizer()?.encode_batch(texts)?;
        self.embed_token_rows(&rows)
    }

    /// Embeddings of many texts, in input order, `batch` at a time; texts of similar token
    /// length are batched together so each batch pads only to its own longest row.
    /// `progress` is told how many texts each finished batch held.
    pub fn embed_texts_batched<S: AsRef<str>>(
        &self,
        texts: &[S],
        batch: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let tok = self.tokenizer()?;
        let mut rows: Vec<(usize, Vec<u32>)> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                tok.encode(t.as_ref()).map(|r| (i, r)).map_err(|e| match e {
                    ModelError::InvalidInput { msg } => ModelError::InvalidInput {
                        msg: format!("text {}: {msg}", i + 1),
                    },
                    other => other,
                })
            })
            .collect::<Result<_, _>>()?;
        rows.sort_by_key(|(_, r)| r.len());
        let mut out = vec![Vec::new(); texts.len()];
        for chunk in rows.chunks(batch.max(1)) {
            let padded =
                tokenizer::pad_rows(chunk.iter().map(|(_, r)| r.clone()).collect(), tok.pad_id());
            for ((i, _), e) in chunk.iter().zip(self.embed_token_rows(&padded)?) {
                out[*i] = e;
            }
            progress(chunk.len());
        }
        Ok(out)
    }

    /// Embeddings of many images, in input order, `batch` at a time; `prepare` decodes and
    /// preprocesses one item and runs on the thread pool while the model waits for the batch.
    pub fn embed_images_batched<T: Sync, E: From<ModelError> + Send>(
        &self,
        items: &[T],
        batch: usize,
        prepare: impl Fn(&T, &ImagePreprocessor) -> Result<Vec<f32>, E> + Sync,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>, E> {
        use rayon::prelude::*;
        let pre = self.image_preprocessor()?;
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(batch.max(1)) {
            let pixels = chunk
                .par_iter()
                .map(|x| prepare(x, pre))
                .collect::<Result<Vec<_>, E>>()?;
            out.extend(self.embed_pixels(&pixels)?);
            progress(chunk.len());
        }
        Ok(out)
    }

    /// Embeddings of preprocessed images (each `[3, H, W]` flattened), in order, as one batch.
    pub fn embed_pixels(&self, images: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        self.embed_pixel_batch(&self.pixel_batch(images)?)
    }

    /// Preprocessed images as one `[n, 3, H, W]` batch on the model's device, in its dtype
    /// (through a page-locked staging buffer on a GPU: [`upload::PixelUpload`]).
    pub fn pixel_batch(&self, images: &[Vec<f32>]) -> Result<Tensor, ModelError> {
        let size = self.image_preprocessor()?.output_size();
        self.uploads.batch(images, size, &self.device, self.dtype)
    }

    /// Embeddings of a pixel batch already on the device (the model's work alone: `bench`).
    pub fn embed_pixel_batch(&self, pixels: &Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
        let features = self.clip.image_features(pixels, Mode::Inference)?;
        Ok(features.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
}
