//! CLIP itself, shared by serving and training.
//!
//! [`config`] reads `config.json`; [`layers`], [`text`], [`vision`] and [`clip`] are the one model
//! definition (differentiable in [`Mode::Train`], fused kernels in [`Mode::Inference`]); [`load`]
//! finds checkpoints; [`preprocess`] ([`tokenizer`], [`image`]) turns raw inputs into tower
//! inputs and [`upload`] moves image batches to the device; [`device`] picks where and in which
//! precision to run, and [`policy`] which kernels a loaded model runs. The kernels live apart, per device, in
//! [`kernels`] ([`cpu`], [`amx`], `cuda`); the fused custom ops that run them, inference and
//! training, in [`ops`]. [`onnx`] writes a tower as an ONNX graph for other runtimes. [`Encoder`] ties them into the one object the
//! CLI, the executor and the evaluator use to turn texts and images into embeddings.

pub mod backbones;
pub mod clip;
pub mod config;
pub mod device;
pub mod kernels;
pub mod layers;
pub mod load;
pub mod onnx;
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

/// The image preprocessing of `files` (`preprocessor_config.json`, or the defaults without one)
/// for a vision tower of `vision`'s size. Preprocessing that makes images of another size is
/// refused at load: every batch of them would fail at the tower anyway, and only after each
/// image had been made, which for a crop_size of 8000 was 768 MB an image.
pub(crate) fn image_config(
    files: &ModelFiles,
    vision: &config::VisionConfig,
) -> Result<ImageConfig, ModelError> {
    let (cfg, path, why) = match &files.preprocessor {
        Some(p) => (ImageConfig::from_file(p)?, p, ""),
        None => (
            ImageConfig::default(),
            &files.config,
            "there is no preprocessor_config.json, and the default preprocessing does not fit: ",
        ),
    };
    cfg.fits_tower(vision.image_size)
        .map_err(|msg| ModelError::Config {
            path: path.clone(),
            msg: format!("{why}{msg}"),
        })?;
    Ok(cfg)
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
        let images = match &clip.vision {
            Some(v) => Some(
                ImagePreprocessor::new(image_config(files, v.config())?)
                    .with_max_pixels(opts.max_image_pixels),
            ),
            None => None,
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
        self.embed_texts_numbered(texts, 1, batch, progress)
    }

    /// [`Self::embed_texts_batched`] for texts that are part of a longer sequence (a stream
    /// embedded a chunk at a time): errors number the texts from `first`, the number of the
    /// first one in the whole sequence.
    pub fn embed_texts_numbered<S: AsRef<str>>(
        &self,
        texts: &[S],
        first: usize,
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
                        msg: format!("text {}: {msg}", first + i),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of the tiny fixture with `preprocessor_config.json` edited by `edit`.
    fn tiny_with_preprocessor(dir: &Path, edit: impl Fn(&mut serde_json::Value)) -> ModelFiles {
        let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip-tiny");
        for e in std::fs::read_dir(&tiny).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        let p = dir.join("preprocessor_config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
        ModelFiles::resolve(dir.to_str().unwrap()).unwrap()
    }

    /// A crop that is not the tower's image size is refused at load, naming the file and both
    /// sizes (it used to be accepted, and each image of an 8000x8000 crop then cost 768 MB
    /// before the batch was refused); so is a resize without a crop to another size. A text-only
    /// load does not read the preprocessing.
    #[test]
    fn preprocessing_must_make_the_tower_image_size() {
        let dir = tempfile::tempdir().unwrap();
        let files = tiny_with_preprocessor(dir.path(), |v| {
            v["crop_size"] = serde_json::json!({"height": 8000, "width": 8000})
        });
        let e = Encoder::load(&files, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("preprocessor_config.json")
                && e.contains("8000x8000")
                && e.contains("224x224"),
            "{e}"
        );
        let text_only = LoadOptions {
            towers: Towers::TEXT,
            ..LoadOptions::default()
        };
        assert!(Encoder::load(&files, &text_only).is_ok());

        let files = tiny_with_preprocessor(dir.path(), |v| {
            v["do_center_crop"] = false.into();
            v["size"] = serde_json::json!({"shortest_edge": 256});
        });
        let e = Encoder::load(&files, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("preprocessor_config.json") && e.contains("shortest_edge 256"),
            "{e}"
        );

        let files = tiny_with_preprocessor(dir.path(), |_| {});
        assert!(Encoder::load(&files, &LoadOptions::default()).is_ok());
    }

    /// Without `preprocessor_config.json` the defaults (224x224) must fit too; the error then
    /// names `config.json`, where the tower's size comes from.
    #[test]
    fn default_preprocessing_must_fit_the_tower() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = tiny_with_preprocessor(dir.path(), |_| {});
        files.preprocessor = None;
        let vision = |image_size| config::VisionConfig {
            image_size,
            ..ClipConfig::from_file(&files.config)
                .unwrap()
                .vision
                .unwrap()
        };
        assert!(image_config(&files, &vision(224)).is_ok());
        let e = image_config(&files, &vision(336)).unwrap_err().to_string();
        assert!(
            e.contains("config.json")
                && e.contains("no preprocessor_config.json")
                && e.contains("336x336"),
            "{e}"
        );
    }
}
