//! clipft: fine-tune and serve CLIP for text-to-image search, in one binary.
//!
//! # Map
//! - [`model`]: CLIP itself, one definition for serving and training. `config` (HF config.json),
//!   `layers`/`text`/`vision`/`clip` (the towers; differentiable in `Mode::Train`, fused kernels
//!   in `Mode::Inference`), `load` (HF folder or hub repo id -> the selected towers' tensors,
//!   read one by one), `preprocess` (`tokenizer`: CLIP BPE, 77 tokens, pad to longest; `image`:
//!   Pillow-exact bicubic resize of the window the centre crop keeps, normalise), `device`,
//!   `backbones` (the named backbones, Finetuner's display names), `onnx` (a tower
//!   written as an ONNX graph for ONNX Runtime and clip-as-service: `clipft export`, `fit
//!   --to-onnx`), `upload` (image batches to
//!   the device: a page-locked staging buffer on a GPU), `policy` (`Kernels`: which
//!   kernels a model runs, decided once from device, dtype and `--matmul-precision` when a
//!   `Clip` is built, and carried by every layer; logged at load). Apart from the definition:
//!   `kernels` per device (`cpu`: GEMM with bias/residual prefilled, in-place activations,
//!   one-pass layer norm and attention, pooled buffers; `cpu_block`: a whole encoder block from
//!   those over weights the layers lend as slices; `amx` beside them: bf16x3 products on Intel
//!   AMX tiles; `adam`: the optimiser's update over one parameter; `seqs`: where a batch's
//!   sequences lie in its rows, uniform or packed end to end (the text tower computes each
//!   caption only up to its end-of-text token); `cuda`: CUDA kernels
//!   compiled to PTX under the `cuda` feature, forward and backward side by side (attention on
//!   the stacked QKV projection, layer norm, linear tails, the towers' embeddings, CLIPLoss, the
//!   Adam step over every parameter at once), each beside the CPU twin the test suite runs and
//!   run by it on a CPU emulator of CUDA threads (`cuda-emu/`)) and `ops` (`fused_attention`, `fused_norm`, `fused_tail`, `embed`:
//!   those kernels as the GPU path's ops, each with a backward that is itself an op; `gpu_block`: a
//!   whole block of those as one training node, their backward run straight through; `packed`: a
//!   packed batch's offsets as the ops share them, on the device once per pass;
//!   the CPU training graph's custom ops, `train_ops`: layer norm, quick_gelu, softmax, linear and
//!   attention as single CPU ops with their own backward; `train_block`: a whole transformer
//!   block as one op, the last one computing only the pooled rows; `train_embed`: the
//!   embeddings as one op per tower). [`model::Encoder`] is the object everything else uses to
//!   turn texts and images into embeddings.
//! - [`docarray`]: datasets on disk, streamed: Finetuner-style CSV (`csv`), docarray v1 files in
//!   both protocols and every compression (`file`, with the generated `proto` types); images are
//!   lazy references decoded only when used, their bytes in memory up to a budget and spilled to
//!   disk past it (`spill`), http(s) ones fetched only from the hosts allowed (`remote`).
//!   `validate_dataset` vets a file before training or upload, streaming.
//! - [`eval`]: docarray v1's nine retrieval metrics (`metrics`), the exact top-k evaluator
//!   (`evaluator`), and `evaluate_model`, which embeds labelled queries and index with a model.
//! - [`protocol`]: the wire: generated `jina.proto` / `docarray.proto` types and services
//!   (`proto/`, compiled by protox, no system protoc), the ndarray codec (`ndarray`), docarray
//!   access paths (`paths`), Jina's parameter rules (`params`), and how peers connect
//!   (`transport`: grpc:// in the clear or grpcs:// over TLS, one place for every client and
//!   server).
//! - [`executor`]: the Jina-compatible gRPC service: `server` (tonic: Jina's services, health,
//!   reflection v1alpha + v1, limits, the `is-error` trailer, shutdown), `endpoints` (`Core`:
//!   routing, parameters, document classification, preprocessing, writing embeddings and rank
//!   scores), `pool` (the preprocessing threads, one item of each waiting request in turn), `batcher` (one bounded queue per tower, a model thread batching across requests),
//!   `status` (every error -> Jina status, one place), `config` (`--uses` executor YAML),
//!   `client` (a Rust client used by the demo).
//! - [`telemetry`]: Prometheus metrics with Jina's names (`metrics`); OpenTelemetry traces over
//!   OTLP/gRPC (`tracing`: the set-up any service calls, and its guard; `grpc`: a span per call
//!   continuing the caller's W3C trace, and `decode`/`encode` spans in the generated services'
//!   codec).
//! - [`trainer`]: fine-tuning: `loss` (CLIPLoss), `optim` (Adam/AdamW in place, gradient
//!   clipping), `schedule`, `train` (the model as variables, one training step), `fit` (a whole
//!   run: data, epochs, callbacks, before/after evaluation, artifact), `callbacks`
//!   (BestModelCheckpoint, EarlyStopping, WiSE-FT decisions), `checkpoint` (TrainingCheckpoint:
//!   resumable state in a run's work folder), and the service: `runs` (the registry: records in
//!   `--data-dir`, the queue, worker threads, restart recovery; `runs::experiments`, the groups
//!   runs are listed and deleted by), `datasets` (the named-dataset
//!   store, and packing local data for a push), `service` (tonic over `proto/trainer.proto`,
//!   bearer token, every trainer error -> gRPC status in one place), `client` (what `fit
//!   --trainer`, `runs` and `data` use).
//! - [`artifact`]: the artifact layout: staged writing and atomic rename, zips, submodel
//!   selection, and loading Finetuner's own `model.pt` artifacts.
//! - [`cli`]: one module per subcommand; parse flags, call the library, print (through
//!   `cli::output`, which ends quietly when the reader of a pipe has gone).
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
//! shuffle seeded by (seed, epoch) -> batches (texts tokenized, images preprocessed on the
//! thread pool) -> [`trainer::train::TrainModel::train_step`] (the same towers in `Mode::Train`
//! inside `train_ops::with_direct_weight_grads`, so that on the CPU each block and embedding is
//! one op whose weight gradients skip candle's store; CLIPLoss, backward, in-place optimiser,
//! logit_scale clamp) -> checkpoints on a timer ->
//! at each epoch end: validation loss, retrieval metrics on the weights being trained, the
//! callbacks, a checkpoint -> best weights restored, WiSE-FT -> the artifact staged, evaluated
//! (before: the backbone; after: the staged artifact) and renamed into place.
//!
//! # The trainer service
//! `cli::trainer` -> [`trainer::runs::Registry::open`] (lists the runs in `--data-dir`, queues
//! the unfinished ones to resume) -> [`trainer::service::serve`]. `CreateRun` validates the
//! configuration and its datasets, writes `run.json`, and queues the run; the scheduler starts
//! at most `--max-concurrent-runs` worker threads, each running [`trainer::fit::fit`] on the
//! datasets' files with a work folder for checkpoints and a log that `StreamLogs` followers
//! tail. Cancel sets the run's flag (checked before every step); SIGTERM makes running runs
//! checkpoint and stay STARTED. `clipft fit --trainer` packs local files
//! ([`trainer::datasets::pack`]), pushes them, creates the run and follows it.
//!
//! # The request path (executor)
//! `cli::executor` (flags, `--uses` YAML) -> [`model::Encoder::load`] -> [`executor::Core`]
//! (packs weights for AMX and drops the f32 copies; starts a model thread per tower) ->
//! [`executor::serve`]. A request: tonic decodes `DataRequestProto` (size-limited) ->
//! `JinaRPC/Call` (requests of a stream run concurrently) or `process_single_data` ->
//! [`executor::Core::handle`]: endpoint, parameters, access paths, each document classified as
//! text / image / pass-through -> admission to the tower's bounded queue (streams wait, unary
//! calls get RESOURCE_EXHAUSTED) -> tokenize or decode + resize on the preprocessing pool ->
//! [`executor::Batcher`]: the model thread takes what is queued up to the minibatch, texts
//! grouped by length, drops requests whose caller left -> embeddings written into the documents
//! (`<f4` ndarray), image content dropped on request, rank scores -> reply with status and route;
//! errors travel in-band (`header.status`, `is-error` trailer) via [`executor::ExecutorError`].

pub mod artifact;
pub mod cli;
pub mod docarray;
pub mod eval;
pub mod executor;
pub mod model;
pub mod protocol;
pub mod telemetry;
pub mod trainer;
