//! What the executor does with one request: route the endpoint (`/encode`, `/rank`, clip_server's
//! catch-all `/default`, `_jina_dry_run_`), read the parameters, select documents by access path,
//! classify each for the towers this executor serves, preprocess them on the preprocessing pool,
//! embed them through the tower queues and write the embeddings (and rank scores) back in place.
//! Every other field of every document is left as it was sent; a failed request comes back
//! unchanged with an error status. When traces are exported, each tower's work shows as
//! `admission` (waiting for room in its queue), `preprocess` and, from the batcher, `queue` and
//! `model` spans under the request's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::try_join;
use tracing::Instrument;

use super::batcher::{Batcher, Input, Source, Tower};
use super::inflight::InFlight;
use super::pool::PreprocessPool;
use super::status::{self, ExecutorError};
use crate::docarray::{decode_data_uri, HttpFetch, ImageHosts};
use crate::model::{ClipTokenizer, ImagePreprocessor};
use crate::protocol::docarray::{document_proto, DocumentProto, NamedScoreProto};
use crate::protocol::jina::{data_request_proto, DataRequestProto, RouteProto};
use crate::protocol::ndarray;
use crate::protocol::params::Params;
use crate::protocol::paths::{self, AccessPaths, Address, Step};

/// The endpoint Jina's dry run sends through a Flow.
pub const DRY_RUN_ENDPOINT: &str = "_jina_dry_run_";

/// What `endpoint_discovery` advertises. `/default` makes a Jina gateway send every endpoint
/// here, as it does for clip_server.
pub const ENDPOINTS: [&str; 4] = ["/default", "/encode", "/rank", DRY_RUN_ENDPOINT];

/// clip-as-service's rank temperature: `exp(4.60517)`, i.e. a logit scale of about 100.
fn rank_logit_scale() -> f64 {
    4.60517f64.exp()
}

/// Where image URIs may be read from.
#[derive(Debug, Clone)]
pub struct ImagePolicy {
    /// Local paths and `file://` URIs are read only below this folder (canonical).
    pub root: Option<PathBuf>,
    /// Whether http(s) URIs are fetched at all.
    pub allow_http: bool,
    /// How they are fetched: body and time limits, which hosts.
    pub http: HttpFetch,
}

impl Default for ImagePolicy {
    fn default() -> Self {
        Self {
            root: None,
            allow_http: false,
            http: HttpFetch {
                max_bytes: 20 << 20,
                timeout: Duration::from_secs(10),
                hosts: ImageHosts::default(),
            },
        }
    }
}

/// The request-side half of the executor: everything but the model itself.
pub struct Core {
    /// The executor's name: its route entry and the key of per-executor parameters.
    pub name: String,
    pub text: Option<Batcher>,
    pub vision: Option<Batcher>,
    pub tokenizer: Option<ClipTokenizer>,
    pub images: Option<ImagePreprocessor>,
    pub policy: ImagePolicy,
    /// Decoding, resizing and tokenizing run here, beside the model threads, one item of each
    /// waiting request in turn.
    pub pool: Arc<PreprocessPool>,
    /// Access paths when a request names none.
    pub default_paths: AccessPaths,
    /// Documents one request may ask to encode.
    pub max_request_docs: usize,
    /// The memory requests in flight hold together.
    pub inflight: InFlight,
}

/// One request's outcome: the reply to send, and whether it carries an error status.
pub struct Handled {
    pub reply: DataRequestProto,
    pub failed: bool,
}

enum Endpoint {
    Encode,
    Rank,
    DryRun,
}

fn route_endpoint(e: &str) -> Endpoint {
    if e == DRY_RUN_ENDPOINT {
        Endpoint::DryRun
    } else if e == "/rank" || e.starts_with("/rank/") {
        Endpoint::Rank
    } else {
        // `/encode`, `/encode/<model>`, `/`, `/default` and anything else: clip_server binds
        // encode to the catch-all.
        Endpoint::Encode
    }
}

/// The endpoint as a metric label: the endpoints served, else `other`. Clients choose endpoint
/// strings freely, and each label value is a series kept for the process's life: labelled as
/// sent, random endpoints grew memory and every scrape without end.
fn endpoint_label(e: &str) -> &'static str {
    ENDPOINTS
        .into_iter()
        .chain(["/"])
        .find(|known| *known == e)
        .unwrap_or("other")
}

/// The request-level options, read from the parameters.
struct Options {
    paths: AccessPaths,
    drop_image_content: bool,
    minibatch: Option<usize>,
    /// The request came straight from a client (no gateway wrote a route before us). Then a
    /// document none of our towers can embed fails the request with the reason; behind a
    /// gateway it passes through, since another executor of the Flow may embed it.
    direct: bool,
}

impl Core {
    /// Processes one request. `wait` chooses back-pressure (streams wait for queue room and
    /// for the memory budget of requests in flight) or refusal (unary calls); `source` is the caller the tower queues share batches fairly
    /// between (a stream's requests share one). Errors that fail the whole call (full queue,
    /// memory budget spent, shutting down) are `Err`; every other error comes back in-band.
    pub async fn handle(
        &self,
        mut req: DataRequestProto,
        wait: bool,
        source: Source,
    ) -> Result<Handled, ExecutorError> {
        use prost::Message;
        let arrived = SystemTime::now();
        let started = std::time::Instant::now();
        let runtime = self.name.clone();
        metrics::histogram!("jina_received_request_bytes", "runtime_name" => runtime.clone())
            .record(req.encoded_len() as f64);
        let endpoint = req
            .header
            .as_ref()
            .and_then(|h| h.exec_endpoint.clone())
            .unwrap_or_else(|| "/default".into());
        let route = route_endpoint(&endpoint);
        // Held until the reply is built; refused before any other work (it fails the call).
        // A dry run computes nothing: a gateway's readiness probe is answered whatever the load.
        let _hold = match route {
            Endpoint::DryRun => None,
            _ => {
                let (bytes, docs) = crate::protocol::budget::held(&req);
                let cost = self.inflight.cost(bytes, docs);
                match self.inflight.hold(cost, wait).await {
                    Ok(h) => Some(h),
                    Err(e) => {
                        metrics::counter!("jina_failed_requests_total", "runtime_name" => runtime)
                            .increment(1);
                        return Err(e);
                    }
                }
            }
        };
        // For logs and traces: a client may send an endpoint of megabytes.
        let shown = match endpoint.len() {
            0..=256 => std::borrow::Cow::Borrowed(endpoint.as_str()),
            _ => std::borrow::Cow::Owned(crate::docarray::quoted(&endpoint)),
        };
        // The traced call's span (or the stream request's) declares these fields. Counts are
        // recorded as i64: OpenTelemetry has no unsigned integers.
        let span = crate::telemetry::tracing::enabled().then(|| {
            let span = tracing::Span::current();
            span.record("endpoint", shown.as_ref());
            if let Some(h) = &req.header {
                span.record("request_id", h.request_id.as_str());
            }
            if let Some(data_request_proto::data_content_proto::Documents::Docs(da)) =
                req.data.as_ref().and_then(|d| d.documents.as_ref())
            {
                span.record("docs", da.docs.len() as i64);
            }
            span
        });
        let outcome = match route {
            Endpoint::DryRun => Ok(0),
            Endpoint::Encode => self.encode_request(&mut req, wait, source).await,
            Endpoint::Rank => self.rank_request(&mut req, wait, source).await,
        };
        if let Some(span) = &span {
            match &outcome {
                Ok(n) => span.record("embedded", *n as i64),
                Err(_) => span.record("otel.status_code", "error"),
            };
        }
        let labels = [
            ("executor", status::EXECUTOR_CLASS.to_string()),
            ("executor_endpoint", endpoint_label(&endpoint).to_string()),
            ("runtime_name", runtime.clone()),
        ];
        metrics::histogram!("jina_process_request_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
        let failed = match outcome {
            Ok(docs) => {
                metrics::counter!("jina_document_processed_total", &labels).increment(docs as u64);
                false
            }
            Err(e) if e.fails_call() => {
                metrics::counter!("jina_failed_requests_total", "runtime_name" => runtime)
                    .increment(1);
                return Err(e);
            }
            Err(e) => {
                tracing::info!(endpoint = %shown, error = %e.message(), "request failed");
                let header = req.header.get_or_insert_with(Default::default);
                header.status = Some(e.to_status());
                true
            }
        };
        let (arrived, now) = whole_milliseconds(arrived, SystemTime::now());
        let status = req.header.as_ref().and_then(|h| h.status.clone());
        // A client that talks to us directly (clip_client without a gateway) reads routes[0] as
        // the gateway and routes[1] as the executor; a gateway replaces both with its own.
        if req.routes.is_empty() {
            req.routes.push(RouteProto {
                executor: "gateway".into(),
                start_time: Some(arrived.into()),
                end_time: Some(now.into()),
                status: status.clone(),
            });
        }
        req.routes.push(RouteProto {
            executor: self.name.clone(),
            start_time: Some(arrived.into()),
            end_time: Some(now.into()),
            status: Some(status.unwrap_or_else(status::success)),
        });
        let outcome_metric = if failed {
            "jina_failed_requests_total"
        } else {
            "jina_successful_requests_total"
        };
        metrics::counter!(outcome_metric, "runtime_name" => runtime.clone()).increment(1);
        metrics::histogram!("jina_sent_response_bytes", "runtime_name" => runtime.clone())
            .record(req.encoded_len() as f64);
        metrics::histogram!("jina_receiving_request_seconds", "runtime_name" => runtime)
            .record(started.elapsed().as_secs_f64());
        Ok(Handled { reply: req, failed })
    }

    fn options(&self, req: &DataRequestProto, rank: bool) -> Result<Options, ExecutorError> {
        let p = Params::for_executor(req.parameters.as_ref(), &self.name);
        let bad = ExecutorError::BadParameter;
        let paths = match p
            .str("access_paths")
            .map_err(bad)?
            .or(p.str("traversal_paths").map_err(bad)?)
        {
            _ if rank => AccessPaths::parse("@r,m").map_err(bad)?,
            Some(s) => AccessPaths::parse(s).map_err(bad)?,
            None => self.default_paths.clone(),
        };
        Ok(Options {
            paths,
            drop_image_content: p.bool("drop_image_content").map_err(bad)?.unwrap_or(false),
            minibatch: p.positive("minibatch_size").map_err(bad)?,
            direct: req.routes.is_empty(),
        })
    }

    /// Returns the number of documents embedded.
    async fn encode_request(
        &self,
        req: &mut DataRequestProto,
        wait: bool,
        source: Source,
    ) -> Result<usize, ExecutorError> {
        let opts = self.options(req, false)?;
        let Some(docs) = docs_mut(req)? else {
            return Ok(0);
        };
        let addrs = opts.paths.select(docs);
        let done = self.embed(docs, &addrs, &opts, wait, source).await?;
        if opts.drop_image_content {
            for a in done
                .iter()
                .filter(|(_, t)| *t == Tower::Vision)
                .map(|(a, _)| a)
            {
                if let Some(d) = paths::get_mut(docs, a) {
                    if matches!(
                        d.content,
                        Some(document_proto::Content::Blob(_) | document_proto::Content::Tensor(_))
                    ) {
                        d.content = None;
                    }
                }
            }
        }
        Ok(done.len())
    }

    async fn rank_request(
        &self,
        req: &mut DataRequestProto,
        wait: bool,
        source: Source,
    ) -> Result<usize, ExecutorError> {
        match (&self.text, &self.vision) {
            (Some(_), Some(_)) => {}
            (Some(_), None) => return Err(ExecutorError::RankNeedsBothTowers("clip-text")),
            _ => return Err(ExecutorError::RankNeedsBothTowers("clip-vision")),
        }
        let opts = self.options(req, true)?;
        let Some(docs) = docs_mut(req)? else {
            return Ok(0);
        };
        let addrs = opts.paths.select(docs);
        let embedded = self.embed(docs, &addrs, &opts, wait, source).await?.len();
        for (i, root) in docs.iter_mut().enumerate() {
            if root.matches.is_empty() {
                continue;
            }
            let q = embedding_of(root).ok_or_else(|| ExecutorError::BadDocument {
                at: format!("docs[{i}]"),
                id: root.id.clone(),
                reason: "a /rank query needs text or an image".into(),
            })?;
            let mut cosines = Vec::with_capacity(root.matches.len());
            for (k, m) in root.matches.iter().enumerate() {
                let c = embedding_of(m).ok_or_else(|| ExecutorError::BadDocument {
                    at: format!("docs[{i}].matches[{k}]"),
                    id: m.id.clone(),
                    reason: "a /rank candidate needs text or an image".into(),
                })?;
                cosines.push(cosine(&q, &c));
            }
            let scale = rank_logit_scale();
            let top = cosines
                .iter()
                .fold(f64::NEG_INFINITY, |a, &c| a.max(scale * c));
            let exps: Vec<f64> = cosines.iter().map(|c| (scale * c - top).exp()).collect();
            let sum: f64 = exps.iter().sum();
            for ((m, c), e) in root.matches.iter_mut().zip(&cosines).zip(&exps) {
                m.scores.insert(
                    "clip_score".into(),
                    NamedScoreProto {
                        value: (e / sum) as f32,
                        op_name: "softmax".into(),
                        ..Default::default()
                    },
                );
                m.scores.insert(
                    "clip_score_cosine".into(),
                    NamedScoreProto {
                        value: *c as f32,
                        op_name: "cosine".into(),
                        ..Default::default()
                    },
                );
                m.embedding = None;
            }
            let score = |d: &DocumentProto| d.scores.get("clip_score").map_or(0.0, |s| s.value);
            root.matches.sort_by(|a, b| score(b).total_cmp(&score(a)));
        }
        Ok(embedded)
    }

    /// Embeds the documents at `addrs` that this executor's towers can take, and writes the
    /// embeddings in place. Returns what was embedded by which tower.
    async fn embed(
        &self,
        docs: &mut [DocumentProto],
        addrs: &[Address],
        opts: &Options,
        wait: bool,
        source: Source,
    ) -> Result<Vec<(Address, Tower)>, ExecutorError> {
        let minibatch = opts.minibatch;
        let mut texts = Vec::new();
        let mut images = Vec::new();
        let mut unservable = Vec::new();
        for a in addrs {
            let Some(d) = paths::get(docs, a) else {
                continue;
            };
            match classify(d) {
                Some(Kind::Text(t)) if self.text.is_some() => {
                    texts.push((a.clone(), t.to_string()))
                }
                Some(Kind::Image(src)) if self.vision.is_some() => images.push((a.clone(), src)),
                Some(Kind::Text(_)) => unservable.push((a, "text", "clip-vision", "clip-text")),
                Some(Kind::Image(_)) => {
                    unservable.push((a, "an image", "clip-text", "clip-vision"))
                }
                // Nothing to embed (an empty document, as clip_client's profile() sends).
                None => {}
            }
        }
        if let Some(&(a, what, serves, needs)) = unservable.first() {
            let id = paths::get(docs, a)
                .map(|d| d.id.clone())
                .unwrap_or_default();
            let reason = format!(
                "the document holds {what}, but this executor serves only {serves}: send it to an executor serving {needs} (or start this one with --select-model all)"
            );
            metrics::counter!("clipft_unservable_documents_total", "direct" => opts.direct.to_string())
                .increment(unservable.len() as u64);
            if opts.direct {
                tracing::info!(docs = unservable.len(), "refused: {} {reason}", describe(a));
                return Err(bad_doc(a, &id, reason));
            }
            // Behind a gateway another executor of the Flow may embed it.
            tracing::info!(
                docs = unservable.len(),
                "passed through without an embedding: {} {reason}",
                describe(a)
            );
        }
        let n = texts.len() + images.len();
        if n > self.max_request_docs {
            return Err(ExecutorError::TooManyDocs {
                docs: n,
                limit: self.max_request_docs,
            });
        }
        let text_addrs: Vec<Address> = texts.iter().map(|(a, _)| a.clone()).collect();
        let image_addrs: Vec<Address> = images.iter().map(|(a, _)| a.clone()).collect();
        let ids = |list: &[Address]| -> Vec<String> {
            list.iter()
                .map(|a| {
                    paths::get(docs, a)
                        .map(|d| d.id.clone())
                        .unwrap_or_default()
                })
                .collect()
        };
        let (text_ids, image_ids) = (ids(&text_addrs), ids(&image_addrs));
        let text_fut = async {
            let (Some(batcher), Some(tok)) = (&self.text, self.tokenizer.clone()) else {
                return match (&self.text, texts.is_empty()) {
                    (Some(_), false) => Err(ExecutorError::Model("no tokenizer".into())),
                    _ => Ok(Vec::new()),
                };
            };
            let items: Vec<_> = texts.into_iter().zip(text_ids).collect();
            self.embed_chunked(
                batcher,
                items,
                (wait, source),
                minibatch,
                move |((a, t), id)| {
                    tok.encode(t)
                        .map(Input::Tokens)
                        .map_err(|e| bad_doc(a, id, e.to_string()))
                },
            )
            .await
        };
        let image_fut = async {
            let (Some(batcher), Some(pre)) = (&self.vision, self.images.clone()) else {
                return match (&self.vision, images.is_empty()) {
                    (Some(_), false) => Err(ExecutorError::Model("no image preprocessor".into())),
                    _ => Ok(Vec::new()),
                };
            };
            let policy = self.policy.clone();
            let items: Vec<_> = images.into_iter().zip(image_ids).collect();
            self.embed_chunked(
                batcher,
                items,
                (wait, source),
                minibatch,
                move |((a, src), id)| {
                    load_image(src, &policy, &pre)
                        .map(Input::Pixels)
                        .map_err(|e| bad_doc(a, id, e))
                },
            )
            .await
        };
        let (text_rows, image_rows) = try_join(text_fut, image_fut).await?;
        let mut done = Vec::with_capacity(n);
        for (tower, list, rows) in [
            (Tower::Text, text_addrs, text_rows),
            (Tower::Vision, image_addrs, image_rows),
        ] {
            for (a, row) in list.into_iter().zip(rows) {
                if let Some(d) = paths::get_mut(docs, &a) {
                    d.embedding = Some(ndarray::embedding(&row));
                }
                done.push((a, tower));
            }
        }
        Ok(done)
    }
}

impl Core {
    /// Embeds `items` on `batcher` in chunks of at most half its queue, each admitted before it
    /// is preprocessed, the next one preprocessed while the one before computes. A request's
    /// decoded images then stay within the queue depth whatever its size: admitted whole, a
    /// request of 10,000 images held all their pixels at once (6 GB at 224 px) while counting
    /// as one queue's worth, and kept the whole queue until its last image was decoded. Only
    /// the first chunk meets `wait`'s refusal; the rest of an admitted request waits its turn.
    async fn embed_chunked<T>(
        &self,
        batcher: &Batcher,
        items: Vec<T>,
        (wait, source): (bool, Source),
        minibatch: Option<usize>,
        prep: impl Fn(&T) -> Result<Input, ExecutorError> + Send + Sync + 'static,
    ) -> Result<Vec<Vec<f32>>, ExecutorError>
    where
        T: Send + Sync + 'static,
    {
        use futures_util::{StreamExt, TryStreamExt};
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let tower = batcher.tower().name();
        let size = (batcher.depth() / 2).max(1);
        let total = items.len();
        let prep = Arc::new(prep);
        let mut items = items.into_iter();
        let chunks = std::iter::from_fn(|| {
            let chunk: Vec<T> = items.by_ref().take(size).collect();
            (!chunk.is_empty()).then_some(chunk)
        });
        let rows: Vec<Vec<Vec<f32>>> = futures_util::stream::iter(chunks.enumerate())
            .map(|(i, chunk)| {
                let prep = prep.clone();
                async move {
                    let docs = chunk.len();
                    let admission = batcher
                        .admit(docs, wait || i > 0)
                        .instrument(tracing::info_span!("admission", tower, docs = docs as i64))
                        .await?;
                    let t0 = std::time::Instant::now();
                    let inputs = self
                        .pool
                        .run(chunk, move |x| prep(x))
                        .instrument(tracing::info_span!("preprocess", tower, docs = docs as i64))
                        .await?;
                    let seconds = t0.elapsed().as_secs_f64();
                    match batcher.tower() {
                        Tower::Text => metrics::histogram!("jina_preprocess_texts_seconds"),
                        Tower::Vision => metrics::histogram!("jina_preprocess_images_seconds"),
                    }
                    .record(seconds);
                    batcher.run(admission, inputs, minibatch, source).await
                }
            })
            .buffered(2)
            .try_collect()
            .await?;
        let mut out = Vec::with_capacity(total);
        for r in rows {
            out.extend(r);
        }
        Ok(out)
    }
}

/// The interval `[start, end]` widened outward to whole milliseconds, and at least one long.
/// Jina's clients read route times with `Timestamp.ToMilliseconds()`, which truncates: an
/// answer of 56 µs would read as 0 ms, and clip_client's `profile()` divides by it. The widened
/// interval still contains the real one; it is the server's time at the resolution the client
/// reads.
fn whole_milliseconds(start: SystemTime, end: SystemTime) -> (SystemTime, SystemTime) {
    use std::time::UNIX_EPOCH;
    let ms =
        |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() / 1_000_000;
    let end = end.max(start);
    let first = ms(start);
    let end_ns = end
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let last = end_ns.div_ceil(1_000_000).max(first + 1);
    let at = |m: u128| UNIX_EPOCH + Duration::from_millis(m as u64);
    (at(first), at(last))
}

fn docs_mut(req: &mut DataRequestProto) -> Result<Option<&mut Vec<DocumentProto>>, ExecutorError> {
    match req.data.as_mut().and_then(|d| d.documents.as_mut()) {
        None => Ok(None),
        Some(data_request_proto::data_content_proto::Documents::DocsBytes(_)) => {
            Err(ExecutorError::PickledDocs)
        }
        Some(data_request_proto::data_content_proto::Documents::Docs(da)) => Ok(Some(&mut da.docs)),
    }
}

/// What a document holds for the model, in clip_server's order: text first, then an image as
/// blob, tensor or uri; anything else is left alone.
enum Kind<'a> {
    Text(&'a str),
    Image(ImageData),
}

/// The image of a document, cloned out of the request so preprocessing can run elsewhere.
#[derive(Debug, Clone)]
pub enum ImageData {
    Blob(bytes::Bytes),
    Tensor(Box<crate::protocol::docarray::NdArrayProto>),
    Uri(String),
}

fn classify(d: &DocumentProto) -> Option<Kind<'_>> {
    match &d.content {
        Some(document_proto::Content::Text(t)) if !t.is_empty() => Some(Kind::Text(t)),
        Some(document_proto::Content::Blob(b)) if !b.is_empty() => {
            Some(Kind::Image(ImageData::Blob(b.clone())))
        }
        Some(document_proto::Content::Tensor(t)) => {
            Some(Kind::Image(ImageData::Tensor(Box::new(t.clone()))))
        }
        _ if !d.uri.is_empty() => Some(Kind::Image(ImageData::Uri(d.uri.clone()))),
        _ => None,
    }
}

fn bad_doc(a: &Address, id: &str, reason: String) -> ExecutorError {
    ExecutorError::BadDocument {
        at: describe(a),
        id: id.to_string(),
        reason,
    }
}

/// `docs[2].chunks[0]`: where a document sits in the request.
pub fn describe(a: &Address) -> String {
    let mut s = format!("docs[{}]", a.root);
    for step in &a.steps {
        match step {
            Step::Chunk(i) => s.push_str(&format!(".chunks[{i}]")),
            Step::Match(i) => s.push_str(&format!(".matches[{i}]")),
        }
    }
    s
}

/// Decodes and preprocesses one image under the URI policy.
pub fn load_image(
    src: &ImageData,
    policy: &ImagePolicy,
    pre: &ImagePreprocessor,
) -> Result<Vec<f32>, String> {
    let e = |e: crate::model::ModelError| e.to_string();
    match src {
        ImageData::Blob(b) => pre.preprocess_bytes(b).map_err(e),
        ImageData::Tensor(t) => {
            let (data, h, w, c) = ndarray::image_pixels(t)?;
            pre.preprocess_hwc_u8(&data, h, w, c).map_err(e)
        }
        ImageData::Uri(uri) => pre
            .preprocess_bytes(&fetch_uri(uri, policy, pre)?)
            .map_err(e),
    }
}

/// The bytes behind an image URI: `data:` always; local files only below the configured root;
/// http(s) only when enabled, within the size and time limits. A local file is read only when
/// it is a regular file no bigger than an image within `pre`'s pixel limit can be.
pub fn fetch_uri(
    uri: &str,
    policy: &ImagePolicy,
    pre: &ImagePreprocessor,
) -> Result<Vec<u8>, String> {
    if uri.starts_with("data:") {
        return decode_data_uri(uri);
    }
    let lower = uri.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        if !policy.allow_http {
            return Err(format!(
                "uri {uri} is not fetched: http(s) image fetching is off (--allow-http-images); send the image as blob"
            ));
        }
        return policy.http.get(uri);
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        if scheme != "file" {
            return Err(format!(
                "uri scheme {scheme:?} is not supported (data:, file paths and http(s) are)"
            ));
        }
    }
    let path = Path::new(uri.strip_prefix("file://").unwrap_or(uri));
    let Some(root) = &policy.root else {
        return Err(format!(
            "uri {uri} is a local file and local files are not read (no --image-root); send the image as blob"
        ));
    };
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    let canon = full
        .canonicalize()
        .map_err(|e| format!("cannot read {uri}: {e}"))?;
    if !canon.starts_with(root) {
        return Err(format!(
            "uri {uri} is outside the image root {}",
            root.display()
        ));
    }
    let max = crate::model::preprocess::image::max_file_bytes(pre.max_pixels);
    crate::model::preprocess::image::read_file(&canon, max)
        .map_err(|e| format!("cannot read {uri}: {e}"))
}

fn embedding_of(d: &DocumentProto) -> Option<Vec<f32>> {
    d.embedding
        .as_ref()
        .and_then(|e| ndarray::to_f32(e).ok())
        .map(|(v, _)| v)
}

/// docarray's cosine similarity (1 - cosine distance), in f64.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_labels_are_a_closed_set() {
        for e in ["/default", "/encode", "/rank", DRY_RUN_ENDPOINT, "/"] {
            assert_eq!(endpoint_label(e), e);
        }
        for e in ["/encode/x", "/search", "", &"/x".repeat(100_000)] {
            assert_eq!(endpoint_label(e), "other");
        }
    }

    #[test]
    fn route_times_are_whole_milliseconds_containing_the_interval() {
        use std::time::UNIX_EPOCH;
        let t = |ns: u64| UNIX_EPOCH + Duration::from_nanos(ns);
        let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis();
        // 56 µs inside one millisecond reads as one millisecond, not zero.
        let (a, b) = whole_milliseconds(t(5_000_100_000), t(5_000_156_000));
        assert_eq!((ms(a), ms(b)), (5000, 5001));
        // Across a boundary: the enclosing milliseconds.
        let (a, b) = whole_milliseconds(t(7_999_900_000), t(8_002_000_001));
        assert_eq!((ms(a), ms(b)), (7999, 8003));
        // Already whole: unchanged.
        let (a, b) = whole_milliseconds(t(9_000_000_000), t(9_004_000_000));
        assert_eq!((ms(a), ms(b)), (9000, 9004));
    }
}
