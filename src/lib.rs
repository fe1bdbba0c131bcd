//! clipft: fine-tune and serve CLIP for text-to-image search, in one binary.
//!
//! # Map
//! - [`model`]: CLIP itself, one definition for serving and training. `config` (HF config.json),
//!   `layers`/`text`/`vision`/`clip` (the towers; differentiable in `Mode::Train`, fused kernels
//!   in `Mode::Inference`), `load` (HF folder or hub repo id -> the selected towers' tensors,
//!   read one by one), `tokenizer` (CLIP BPE, 77 tokens, pad to longest), `image`
//!   (Pillow-exact bicubic resize, centre crop, normalise), `device`, and the inference kernels:
//!   `cpu` (fused f32 blocks: GEMM with bias/residual prefilled, in-place activation, one-pass
//!   layer norm and attention, pooled buffers) and `amx` (bf16x3 products on Intel AMX tiles,
//!   chosen by `--matmul-precision`), and for training `train_ops` (layer norm, quick_gelu,
//!   softmax and attention as single CPU ops with their own backward). [`model::Encoder`] is the
//!   object everything else uses to turn texts and images into embeddings.
//! - [`docarray`]: datasets on disk, streamed: Finetuner-style CSV (`csv`), docarray v1 files in
//!   both protocols and every compression (`file`, with the generated `proto` types); images are
//!   lazy references decoded only when used.
//! - [`eval`]: docarray v1's nine retrieval metrics (`metrics`), the exact top-k evaluator
//!   (`evaluator`), and `evaluate_model`, which embeds labelled queries and index with a model.
//! - [`trainer`]: fine-tuning: `loss` (CLIPLoss), `optim` (Adam/AdamW in place, gradient
//!   clipping), `schedule`, `train` (the model as variables, one training step), `fit` (a whole
//!   run: data, epochs, before/after evaluation, artifact).
//! - [`artifact`]: the artifact layout: staged writing and atomic rename, zips, submodel
//!   selection, and loading Finetuner's own `model.pt` artifacts.
//! - [`cli`]: one module per subcommand; parse flags, call the library, print.
//!
//! # The encode path
//! `cli::encode` -> [`model::ModelFiles::resolve`] (folder / hub cache) -> [`model::Encoder::load`]
//! (config, tokenizer, preprocessor, weights of the selected towers) -> texts: tokenize, pad to
//! the longest, [`model::text::TextTower::forward`]; images: decode, resize, crop, normalise on a
//! thread pool, [`model::vision::VisionTower::forward`] -> projected (not normalised) float32
//! embeddings, in input order.
//!
//! # The evaluation path
//! `cli::eval` -> [`docarray::read_labeled`] (CSV or docarray file) -> [`eval::evaluate_model`]:
//! queries through the text tower, index images through the vision tower (preprocessed on the
//! thread pool), blocked matrix products over the whole index, f64 re-ranking of the best
//! candidates, the nine metrics per query, averaged.
//!
//! # The training path
//! `cli::fit` / `cli::demo` -> [`trainer::fit::fit`]: pairs from [`docarray::open_pairs`] ->
//! seeded shuffle -> batches (texts tokenized, images preprocessed on the thread pool) ->
//! [`trainer::train::TrainModel::train_step`] (the same towers in `Mode::Train`, CLIPLoss,
//! backward, in-place optimiser, logit_scale clamp) -> validation loss per epoch -> the artifact
//! staged, evaluated (before: the backbone; after: the staged artifact) and renamed into place.
//!
//! The Jina-compatible executor, the trainer service and telemetry build on the same
//! [`model::Encoder`] and [`model::Clip`] (the planned request path: the project's shared
//! ARCHITECTURE.md).

pub mod artifact;
pub mod cli;
pub mod docarray;
pub mod eval;
pub mod executor;
pub mod model;
pub mod protocol;
pub mod telemetry;
pub mod trainer;
