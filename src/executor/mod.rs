//! The Jina-compatible executor: `clipft executor` serves CLIP to the real `clip_client` and to
//! Jina Flows over Jina's gRPC protocol.
//!
//! A request flows: [`server`] (tonic services, limits, health, reflection, the `is-error`
//! trailer) -> [`endpoints::Core::handle`] (the request's share of the memory budget of
//! requests in flight, [`inflight`]; endpoint routing, parameters, access paths, document
//! classification, preprocessing on the pool) -> [`batcher::Batcher`] (one bounded queue per
//! tower, a model thread that batches across requests) -> embeddings written into the documents
//! -> reply with status and route. [`status`] maps every error to what a Jina peer expects;
//! [`config`] reads Jina's executor YAML (`--uses`).

pub mod batcher;
pub mod client;
pub mod config;
pub mod endpoints;
pub mod inflight;
pub mod pool;
pub mod server;
pub mod status;

use std::sync::Arc;

pub use batcher::{Batcher, Tower};
pub use endpoints::{Core, ImagePolicy};
pub use pool::PreprocessPool;
pub use server::{serve, ServerConfig};
pub use status::ExecutorError;

use crate::model::Encoder;
use crate::protocol::paths::AccessPaths;

/// How the request side and the queues are sized.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The route name and the key of per-executor parameters.
    pub name: String,
    /// The largest model batch.
    pub minibatch_size: usize,
    /// Documents queued or in compute per tower.
    pub queue_depth: usize,
    /// Documents one request may ask to embed.
    pub max_request_docs: usize,
    /// Bytes all requests in flight may hold together ([`inflight`]).
    pub max_inflight_bytes: u64,
    /// Drop the f32 weights once they are packed for AMX (on a GPU, the separate q, k and v
    /// weights once stacked), and read token embedding rows from the
    /// checkpoint file instead of keeping the table (the executor never trains): see
    /// [`Encoder::release_for_serving`].
    pub release_packed_weights: bool,
    /// Threads that decode and resize images and tokenize texts.
    pub preprocess_threads: usize,
    /// Access paths when a request names none (clip_server's `access_paths`).
    pub access_paths: AccessPaths,
    pub images: ImagePolicy,
}

impl Default for ExecutorOptions {
    fn default() -> Self {
        Self {
            name: "clipft".into(),
            minibatch_size: 32,
            queue_depth: 128,
            max_request_docs: 10_000,
            max_inflight_bytes: inflight::DEFAULT_LIMIT,
            release_packed_weights: true,
            preprocess_threads: 0,
            access_paths: AccessPaths::root(),
            images: ImagePolicy::default(),
        }
    }
}

impl Core {
    /// Starts a model worker per loaded tower and builds the request side around them.
    pub fn start(mut encoder: Encoder, opts: &ExecutorOptions) -> std::io::Result<Arc<Self>> {
        if opts.release_packed_weights {
            let bytes = encoder
                .release_for_serving()
                .map_err(std::io::Error::other)?;
            if bytes > 0 {
                crate::model::cpu::trim_heap();
                tracing::info!(
                    "serving-only weights: released {} MiB (f32 copies of AMX-packed weights, separate q/k/v of stacked GPU projections, token table)",
                    bytes >> 20
                );
            }
        }
        let text = match encoder.clip.text {
            Some(_) => Some(Batcher::start(
                encoder.clone(),
                Tower::Text,
                opts.minibatch_size,
                opts.queue_depth,
            )?),
            None => None,
        };
        let vision = match encoder.clip.vision {
            Some(_) => Some(Batcher::start(
                encoder.clone(),
                Tower::Vision,
                opts.minibatch_size,
                opts.queue_depth,
            )?),
            None => None,
        };
        let threads = match opts.preprocess_threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let pool = PreprocessPool::new(threads)?;
        let inflight = inflight::InFlight::new(opts.max_inflight_bytes, encoder.clip.output_dim());
        Ok(Arc::new(Core {
            name: opts.name.clone(),
            text,
            vision,
            tokenizer: encoder.tokenizer.clone(),
            images: encoder.images.clone(),
            policy: opts.images.clone(),
            pool: Arc::new(pool),
            default_paths: opts.access_paths.clone(),
            max_request_docs: opts.max_request_docs,
            inflight,
        }))
    }
}
