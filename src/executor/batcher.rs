//! The per-tower queue and the model worker behind it. Requests from every stream feed one
//! bounded queue per tower; a dedicated thread (which owns the model's compute) takes whatever is
//! queued up to the minibatch size, groups texts by token length so each batch pads only to its
//! own longest row, runs the tower off the async runtime and hands each request its rows.
//! Admission is counted in documents with a semaphore, so memory is bounded by `--queue-depth`
//! whatever the number of clients; requests whose caller went away are dropped before compute.
//! With traces exported, a request's wait in the queue is its `queue` span and each batch it
//! is part of a `model` span (see `JobTrace`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::status::ExecutorError;
use crate::model::{tokenizer, Encoder};

/// Which tower a queue feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tower {
    Text,
    Vision,
}

impl Tower {
    pub fn name(self) -> &'static str {
        match self {
            Tower::Text => "text",
            Tower::Vision => "vision",
        }
    }
}

/// One tower input, already preprocessed on the request side.
#[derive(Debug)]
pub enum Input {
    /// Token ids, unpadded.
    Tokens(Vec<u32>),
    /// A normalised `[3, H, W]` image, flattened.
    Pixels(Vec<f32>),
}

impl Input {
    fn len_key(&self) -> usize {
        match self {
            Input::Tokens(t) => t.len(),
            Input::Pixels(_) => 0,
        }
    }
}

type Reply = Result<Vec<Vec<f32>>, ExecutorError>;

/// Who a job is for: a stream, or a unary call. The worker fills each model batch taking the
/// oldest job of every source in turn, so one client's queued jobs do not stand ahead of
/// everybody else's.
pub type Source = u64;

/// A source no other caller has.
pub fn new_source() -> Source {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One request's inputs for one tower.
struct Job {
    inputs: Vec<Input>,
    /// The request's own minibatch size (clip_server's `minibatch_size` parameter).
    max_batch: usize,
    reply: oneshot::Sender<Reply>,
    source: Source,
    /// Released when the job is done (before its reply goes out) or dropped, freeing its room
    /// in the queue.
    permit: OwnedSemaphorePermit,
    enqueued: Instant,
    /// Present when traces are exported.
    trace: Option<JobTrace>,
}

/// A job's place in its request's trace: the model thread runs batches mixing several requests,
/// so each request gets its own `model` span for every batch its inputs are in.
struct JobTrace {
    /// The request-side span current when the job was queued: parent of the job's spans.
    parent: tracing::Span,
    /// Open from queueing until the model thread takes the job.
    queue: Option<tracing::Span>,
}

/// Counters the worker keeps; read by the executor's status and by tests.
#[derive(Debug, Default)]
pub struct BatcherStats {
    /// Jobs (one request's inputs for this tower) handed to the worker.
    pub jobs: AtomicU64,
    pub batches: AtomicU64,
    pub items: AtomicU64,
    /// Jobs dropped because the caller had gone before compute.
    pub abandoned: AtomicU64,
    /// Largest batch run so far.
    pub max_batch: AtomicU64,
    /// Microseconds spent in the model.
    pub model_micros: AtomicU64,
}

/// Room in a tower's queue, held from admission until the request's rows are computed.
pub struct Admission(OwnedSemaphorePermit);

/// A handle on one tower's queue; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tower: Tower,
    tx: mpsc::Sender<Job>,
    permits: Arc<Semaphore>,
    depth: usize,
    minibatch: usize,
    pub stats: Arc<BatcherStats>,
}

impl Batcher {
    /// Starts the worker thread for `tower` of `encoder`. `minibatch` caps a model batch;
    /// `depth` caps the documents queued or in compute.
    pub fn start(
        encoder: Encoder,
        tower: Tower,
        minibatch: usize,
        depth: usize,
    ) -> std::io::Result<Self> {
        let depth = depth.max(1);
        let minibatch = minibatch.max(1);
        let (tx, rx) = mpsc::channel(depth);
        let stats = Arc::new(BatcherStats::default());
        let worker_stats = stats.clone();
        std::thread::Builder::new()
            .name(format!("clipft-{}", tower.name()))
            .spawn(move || worker(encoder, tower, minibatch, rx, &worker_stats))?;
        Ok(Self {
            tower,
            tx,
            permits: Arc::new(Semaphore::new(depth)),
            depth,
            minibatch,
            stats,
        })
    }

    pub fn minibatch(&self) -> usize {
        self.minibatch
    }

    pub fn tower(&self) -> Tower {
        self.tower
    }

    /// Documents queued or in compute, at most.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Documents queued or in compute now.
    pub fn queued(&self) -> usize {
        self.depth - self.permits.available_permits()
    }

    /// Takes room for `n` documents in the queue. With `wait`, a full queue makes the caller
    /// wait (streams: back-pressure); without, it fails at once with
    /// [`ExecutorError::QueueFull`] (unary calls). Requests are admitted before they are
    /// preprocessed, in chunks of at most half the queue (`Core::embed_chunked`), so decoded
    /// images in memory are bounded by the queue depth too.
    pub async fn admit(&self, n: usize, wait: bool) -> Result<Admission, ExecutorError> {
        // A request bigger than the whole queue takes all of it rather than never fitting.
        let need = n.clamp(1, self.depth) as u32;
        let permit = if wait {
            self.permits
                .clone()
                .acquire_many_owned(need)
                .await
                .map_err(|_| ExecutorError::ShuttingDown)?
        } else {
            self.permits
                .clone()
                .try_acquire_many_owned(need)
                .map_err(|_| ExecutorError::QueueFull {
                    tower: self.tower.name(),
                    depth: self.depth,
                })?
        };
        metrics::gauge!("clipft_queue_documents", "tower" => self.tower.name())
            .set(self.queued() as f64);
        Ok(Admission(permit))
    }

    /// Embeds admitted `inputs`, in order. Dropping the returned future before it finishes
    /// withdraws the work.
    pub async fn run(
        &self,
        admission: Admission,
        inputs: Vec<Input>,
        max_batch: Option<usize>,
        source: Source,
    ) -> Reply {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        let trace = crate::telemetry::tracing::enabled().then(|| JobTrace {
            parent: tracing::Span::current(),
            queue: Some(tracing::info_span!(
                "queue",
                tower = self.tower.name(),
                docs = inputs.len() as i64
            )),
        });
        let job = Job {
            inputs,
            max_batch: max_batch.unwrap_or(self.minibatch).clamp(1, self.minibatch),
            reply,
            source,
            permit: admission.0,
            enqueued: Instant::now(),
            trace,
        };
        self.tx
            .send(job)
            .await
            .map_err(|_| ExecutorError::ShuttingDown)?;
        self.stats.jobs.fetch_add(1, Ordering::Relaxed);
        let reply = rx.await.map_err(|_| ExecutorError::ShuttingDown)?;
        metrics::gauge!("clipft_queue_documents", "tower" => self.tower.name())
            .set(self.queued() as f64);
        reply
    }

    /// [`Batcher::admit`] then [`Batcher::run`].
    pub async fn embed(&self, inputs: Vec<Input>, max_batch: Option<usize>, wait: bool) -> Reply {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let admission = self.admit(inputs.len(), wait).await?;
        self.run(admission, inputs, max_batch, new_source()).await
    }

    /// Whether the model worker is alive.
    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }
}

/// The worker: blocks for a job, takes every job queued, and runs a minibatch of them chosen
/// fairly ([`fair_pick`]); the rest wait for the next batch.
fn worker(
    encoder: Encoder,
    tower: Tower,
    minibatch: usize,
    mut rx: mpsc::Receiver<Job>,
    stats: &BatcherStats,
) {
    // Jobs taken from the channel, oldest first; they keep their queue room until run.
    let mut pending: std::collections::VecDeque<Job> = std::collections::VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.blocking_recv() {
                Some(j) => pending.push_back(j),
                None => break,
            }
        }
        while let Ok(j) = rx.try_recv() {
            pending.push_back(j);
        }
        let queued: Vec<(Source, usize)> =
            pending.iter().map(|j| (j.source, j.inputs.len())).collect();
        let picked = fair_pick(&queued, minibatch);
        let mut jobs = Vec::with_capacity(picked.len());
        // Highest index first, so the indices left stay valid.
        for &i in picked.iter().rev() {
            if let Some(j) = pending.remove(i) {
                jobs.push(j);
            }
        }
        jobs.reverse();
        // Callers that went away (cancelled stream, closed connection) cost nothing more.
        jobs.retain(|j| {
            let gone = j.reply.is_closed();
            if gone {
                stats.abandoned.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("clipft_abandoned_requests_total", "tower" => tower.name())
                    .increment(1);
            }
            !gone
        });
        if jobs.is_empty() {
            continue;
        }
        let waited = jobs
            .iter()
            .map(|j| j.enqueued.elapsed())
            .max()
            .unwrap_or(Duration::ZERO);
        tracing::debug!(
            tower = tower.name(),
            jobs = jobs.len(),
            waited_ms = waited.as_millis() as u64,
            "batch"
        );
        metrics::histogram!("clipft_queue_wait_seconds", "tower" => tower.name())
            .record(waited.as_secs_f64());
        for job in &mut jobs {
            if let Some(t) = &mut job.trace {
                t.queue.take();
            }
        }
        run_jobs(&encoder, tower, minibatch, jobs, stats);
    }
}

/// Which of the `queued` jobs (source, inputs; oldest first) make the next model batch, as
/// ascending indices: the oldest job of each source in turn, then each source's next, until
/// `minibatch` inputs are taken (the last job may take the batch past it, as a job is not
/// split) or none are left. A request that arrives behind a long stream's queued jobs then
/// joins the next batch, instead of waiting for all of them as first-come-first-served made it.
fn fair_pick(queued: &[(Source, usize)], minibatch: usize) -> Vec<usize> {
    let mut taken = vec![false; queued.len()];
    let mut picked = Vec::new();
    let mut items = 0;
    while items < minibatch && picked.len() < queued.len() {
        let mut seen = std::collections::HashSet::new();
        for (i, &(source, len)) in queued.iter().enumerate() {
            if items >= minibatch {
                break;
            }
            if !taken[i] && seen.insert(source) {
                taken[i] = true;
                picked.push(i);
                items += len;
            }
        }
    }
    picked.sort_unstable();
    picked
}

/// Runs every input of `jobs` in model batches and answers each job.
fn run_jobs(
    encoder: &Encoder,
    tower: Tower,
    minibatch: usize,
    jobs: Vec<Job>,
    stats: &BatcherStats,
) {
    // (job, position in job, input), ordered so that each model batch shares a minibatch
    // cap and texts of similar length sit together.
    let mut order: Vec<(usize, usize, usize, usize)> = Vec::new(); // (cap, len, job, pos)
    let mut inputs: Vec<Vec<Option<Input>>> = Vec::with_capacity(jobs.len());
    for (j, job) in jobs.iter().enumerate() {
        for (p, x) in job.inputs.iter().enumerate() {
            order.push((job.max_batch, x.len_key(), j, p));
        }
    }
    let mut jobs = jobs;
    for job in jobs.iter_mut() {
        inputs.push(
            std::mem::take(&mut job.inputs)
                .into_iter()
                .map(Some)
                .collect(),
        );
    }
    order.sort_unstable();
    let mut results: Vec<Vec<Vec<f32>>> = jobs.iter().map(|_| Vec::new()).collect();
    for (j, row) in inputs.iter().enumerate() {
        results[j] = vec![Vec::new(); row.len()];
    }
    let mut failed: Vec<Option<ExecutorError>> = vec![None; jobs.len()];
    let mut start = 0;
    while start < order.len() {
        let cap = order[start].0.min(minibatch);
        let mut end = start + 1;
        while end < order.len() && end - start < cap && order[end].0 == order[start].0 {
            end += 1;
        }
        let batch = &order[start..end];
        let taken: Vec<Input> = batch
            .iter()
            .filter_map(|&(_, _, j, p)| inputs[j][p].take())
            .collect();
        let spans = model_spans(&jobs, batch, tower);
        let t0 = Instant::now();
        // A bug in the model must not take the tower down: the batch fails, the worker goes on.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            embed_batch(encoder, tower, taken)
        }))
        .unwrap_or_else(|panic| {
            let msg = super::status::panic_message(panic.as_ref());
            tracing::error!(tower = tower.name(), "model panicked: {msg}");
            Err(ExecutorError::Model(format!(
                "internal error in the {} tower: {msg}",
                tower.name()
            )))
        });
        let took = t0.elapsed();
        stats
            .model_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        let encode_metric = match tower {
            Tower::Text => "jina_encode_texts_seconds",
            Tower::Vision => "jina_encode_images_seconds",
        };
        metrics::histogram!(encode_metric).record(took.as_secs_f64());
        metrics::histogram!("clipft_batch_size", "tower" => tower.name())
            .record(batch.len() as f64);
        metrics::counter!("clipft_embedded_total", "tower" => tower.name())
            .increment(batch.len() as u64);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.items.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats
            .max_batch
            .fetch_max(batch.len() as u64, Ordering::Relaxed);
        match out {
            Ok(rows) => {
                for (&(_, _, j, p), row) in batch.iter().zip(rows) {
                    results[j][p] = row;
                }
            }
            Err(e) => {
                for span in &spans {
                    span.record("otel.status_code", "error");
                }
                for &(_, _, j, _) in batch {
                    failed[j] = Some(e.clone());
                }
            }
        }
        drop(spans);
        start = end;
    }
    for ((job, rows), err) in jobs.into_iter().zip(results).zip(failed) {
        // The room is free before the caller hears back: a caller that has its reply sees the
        // queue without its documents.
        let Job { reply, permit, .. } = job;
        drop(permit);
        let _ = reply.send(match err {
            Some(e) => Err(e),
            None => Ok(rows),
        });
    }
}

/// One `model` span per traced request with inputs in `batch`, under that request's span:
/// `batch_size` is the whole model batch, `docs` the request's share of it, `requests` how many
/// requests share it.
fn model_spans(
    jobs: &[Job],
    batch: &[(usize, usize, usize, usize)],
    tower: Tower,
) -> Vec<tracing::Span> {
    if jobs.iter().all(|j| j.trace.is_none()) {
        return Vec::new();
    }
    let mut docs = vec![0usize; jobs.len()];
    for &(_, _, j, _) in batch {
        docs[j] += 1;
    }
    let requests = docs.iter().filter(|&&n| n > 0).count();
    jobs.iter()
        .zip(&docs)
        .filter(|(_, &n)| n > 0)
        .filter_map(|(job, &n)| {
            let trace = job.trace.as_ref()?;
            Some(tracing::info_span!(
                parent: &trace.parent,
                "model",
                tower = tower.name(),
                batch_size = batch.len() as i64,
                docs = n as i64,
                requests = requests as i64,
                otel.status_code = tracing::field::Empty,
            ))
        })
        .collect()
}

fn embed_batch(encoder: &Encoder, tower: Tower, inputs: Vec<Input>) -> Reply {
    let model = |e: crate::model::ModelError| ExecutorError::Model(e.to_string());
    match tower {
        Tower::Text => {
            let rows: Vec<Vec<u32>> = inputs
                .into_iter()
                .filter_map(|x| match x {
                    Input::Tokens(t) => Some(t),
                    Input::Pixels(_) => None,
                })
                .collect();
            let pad = encoder.tokenizer().map_err(model)?.pad_id();
            encoder
                .embed_token_rows(&tokenizer::pad_rows(rows, pad))
                .map_err(model)
        }
        Tower::Vision => {
            let images: Vec<Vec<f32>> = inputs
                .into_iter()
                .filter_map(|x| match x {
                    Input::Pixels(p) => Some(p),
                    Input::Tokens(_) => None,
                })
                .collect();
            encoder.embed_pixels(&images).map_err(model)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request of 8 behind four of a stream's queued requests goes into the next batch.
    #[test]
    fn a_newcomer_joins_the_next_batch() {
        let queued = [(1, 8), (1, 8), (1, 8), (1, 8), (1, 8), (1, 8), (2, 8)];
        assert_eq!(fair_pick(&queued, 32), [0, 1, 2, 6]);
        // First come, first served within a source, and across them turn by turn.
        let queued = [(1, 4), (1, 4), (2, 4), (3, 4), (2, 4), (1, 4)];
        assert_eq!(fair_pick(&queued, 16), [0, 1, 2, 3]);
        assert_eq!(fair_pick(&queued, 20), [0, 1, 2, 3, 4]);
        assert_eq!(fair_pick(&queued, 100), [0, 1, 2, 3, 4, 5]);
    }

    /// A job bigger than the minibatch still runs, alone; nothing queued means nothing picked.
    #[test]
    fn big_jobs_and_empty_queues() {
        assert_eq!(fair_pick(&[(1, 500), (2, 1)], 32), [0]);
        assert_eq!(fair_pick(&[(1, 5), (2, 500), (1, 5)], 32), [0, 1]);
        assert!(fair_pick(&[], 32).is_empty());
    }
}
