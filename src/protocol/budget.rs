//! What a request costs once decoded, estimated from its wire bytes before prost decodes it.
//!
//! The message-size limit bounds the wire, not the memory: an empty `DocumentProto` is two bytes
//! on the wire and several hundred once decoded (the struct, its slot in the parent's `Vec`, the
//! `Vec`'s growth), an empty string in a repeated field two bytes and twenty-four. A 10 MB
//! request of empty documents decoded into gigabytes before the executor could count them and
//! say no, and a larger one took the process down. So the executor's decoder walks the request's
//! wire form first (no allocation per field, the nesting depth bounded as prost bounds it),
//! sums the decoded sizes of the messages it would build ([`estimate`]), and refuses a request
//! over `--max-decoded-bytes` ([`check`]) before decoding it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::docarray::{
    DenseNdArrayProto, DocumentArrayProto, DocumentProto, NamedScoreProto, NdArrayProto,
    SparseNdArrayProto,
};
use crate::protocol::jina::{
    data_request_proto::DataContentProto, status_proto::ExceptionProto, DataRequestListProto,
    DataRequestProto, HeaderProto, RouteProto, SingleDocumentRequestProto, StatusProto,
};

/// The default of [`set_limit`]: well above what any request within the default 256 MiB
/// message size costs when it carries real content (images, texts), far below what 256 MiB of
/// empty documents would.
pub const DEFAULT_LIMIT: u64 = 1 << 30;

/// Nesting deeper than this is refused (prost's own recursion limit).
const MAX_DEPTH: usize = 100;

static LIMIT: AtomicU64 = AtomicU64::new(DEFAULT_LIMIT);

/// Sets the process's decode budget (`--max-decoded-bytes`). The codec is built by tonic's
/// generated services, which take no arguments, so the budget is process-wide: a process
/// serves one executor, which sets it once at start-up.
pub fn set_limit(bytes: u64) {
    LIMIT.store(bytes.max(1), Ordering::Relaxed);
}

/// The process's decode budget.
pub fn limit() -> u64 {
    LIMIT.load(Ordering::Relaxed)
}

/// Why a request was refused before decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// It would take more memory decoded than the budget allows.
    #[error("the request would take about {estimate} bytes once decoded (it is {wire} bytes on the wire); the limit is {limit} (--max-decoded-bytes): send fewer documents per request")]
    OverBudget {
        estimate: u64,
        wire: u64,
        limit: u64,
    },
    /// Its wire form is not a valid message (prost would refuse it too).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

/// The request messages whose decoded size is checked: the ones that carry documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    DataRequest,
    DataRequestList,
    SingleDocument,
    /// One `DocumentProto`, as a docarray v1 file stores it.
    Document,
}

impl Root {
    /// The root for a decoded message type, or None for a type that is not checked.
    pub fn of<U: 'static>() -> Option<Self> {
        use std::any::TypeId;
        let t = TypeId::of::<U>();
        [
            (TypeId::of::<DataRequestProto>(), Self::DataRequest),
            (TypeId::of::<DataRequestListProto>(), Self::DataRequestList),
            (
                TypeId::of::<SingleDocumentRequestProto>(),
                Self::SingleDocument,
            ),
        ]
        .into_iter()
        .find_map(|(id, root)| (id == t).then_some(root))
    }

    fn msg(self) -> Msg {
        match self {
            Self::DataRequest => Msg::DataRequest,
            Self::DataRequestList => Msg::DataRequestList,
            Self::SingleDocument => Msg::SingleDocument,
            Self::Document => Msg::Doc,
        }
    }
}

/// The message types inside a request, as far as their size matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Msg {
    DataRequest,
    DataRequestList,
    SingleDocument,
    Header,
    Status,
    Exception,
    Route,
    DataContent,
    DocArray,
    Doc,
    NdArray,
    Dense,
    Sparse,
    Struct,
    StructEntry,
    Value,
    ListValue,
    ScoreEntry,
    NamedScore,
}

/// What a length-delimited field holds.
enum Field {
    /// A message of this type: walked.
    Message(Msg),
    /// A packed repeated 32-bit scalar: up to four bytes decoded per byte on the wire.
    Packed32,
    /// Bytes or a string (or an unknown field, which prost skips): its length, once.
    Bytes,
}

impl Msg {
    /// The decoded struct's size.
    fn size(self) -> u64 {
        use std::mem::size_of;
        let entry = size_of::<String>() + size_of::<prost_types::Value>() + 16;
        (match self {
            Self::DataRequest => size_of::<DataRequestProto>(),
            Self::DataRequestList => size_of::<DataRequestListProto>(),
            Self::SingleDocument => size_of::<SingleDocumentRequestProto>(),
            Self::Header => size_of::<HeaderProto>(),
            Self::Status => size_of::<StatusProto>(),
            Self::Exception => size_of::<ExceptionProto>(),
            Self::Route => size_of::<RouteProto>(),
            Self::DataContent => size_of::<DataContentProto>(),
            Self::DocArray => size_of::<DocumentArrayProto>(),
            Self::Doc => size_of::<DocumentProto>(),
            Self::NdArray => size_of::<NdArrayProto>(),
            Self::Dense => size_of::<DenseNdArrayProto>(),
            Self::Sparse => size_of::<SparseNdArrayProto>(),
            Self::Struct => size_of::<prost_types::Struct>(),
            Self::StructEntry | Self::ScoreEntry => entry,
            Self::Value => size_of::<prost_types::Value>(),
            Self::ListValue => size_of::<prost_types::ListValue>(),
            Self::NamedScore => size_of::<NamedScoreProto>(),
        }) as u64
    }

    /// What field `n` (length-delimited on the wire) of this message holds.
    fn field(self, n: u32) -> Field {
        use Field::{Bytes, Message as M, Packed32};
        match (self, n) {
            (Self::DataRequest | Self::SingleDocument, 1) => M(Msg::Header),
            (Self::DataRequest | Self::SingleDocument, 2) => M(Msg::Struct),
            (Self::DataRequest | Self::SingleDocument, 3) => M(Msg::Route),
            (Self::DataRequest, 4) => M(Msg::DataContent),
            (Self::SingleDocument, 4) => M(Msg::Doc),
            (Self::DataRequestList, 1) => M(Msg::DataRequest),
            (Self::Header, 2) | (Self::Route, 4) => M(Msg::Status),
            (Self::Status, 3) => M(Msg::Exception),
            (Self::DataContent, 1) => M(Msg::DocArray),
            (Self::DocArray, 1) | (Self::Doc, 14 | 15) => M(Msg::Doc),
            (Self::Doc, 3 | 16) => M(Msg::NdArray),
            (Self::Doc, 17 | 20) | (Self::NdArray, 4) | (Self::Value, 5) => M(Msg::Struct),
            (Self::Doc, 18 | 19) => M(Msg::ScoreEntry),
            (Self::Doc, 13) => Packed32,
            (Self::NdArray, 1) | (Self::Sparse, 1 | 2) => M(Msg::Dense),
            (Self::NdArray, 2) => M(Msg::Sparse),
            (Self::Dense, 2) | (Self::Sparse, 3) => Packed32,
            (Self::Struct, 1) => M(Msg::StructEntry),
            (Self::StructEntry, 2) | (Self::ListValue, 1) => M(Msg::Value),
            (Self::Value, 6) => M(Msg::ListValue),
            (Self::ScoreEntry, 2) => M(Msg::NamedScore),
            _ => Bytes,
        }
    }
}

/// Per field on the wire, whatever its kind: a slot in a `Vec` or map, or a scalar.
const FIELD_COST: u64 = 24;

/// The estimated decoded size of a `root` message whose wire form is `buf`: every message's
/// struct and every field's slot counted twice (a `Vec` grows by doubling), every string's
/// and byte field's contents once.
pub fn estimate(root: Root, buf: &[u8]) -> Result<u64, BudgetError> {
    walk(root.msg(), buf, 0)
}

/// [`estimate`], against the process's budget ([`set_limit`]).
pub fn check(root: Root, buf: &[u8]) -> Result<(), BudgetError> {
    check_against(root, buf, limit())
}

/// [`estimate`], against `limit`.
fn check_against(root: Root, buf: &[u8], limit: u64) -> Result<(), BudgetError> {
    let estimate = estimate(root, buf)?;
    if estimate > limit {
        return Err(BudgetError::OverBudget {
            estimate,
            wire: buf.len() as u64,
            limit,
        });
    }
    Ok(())
}

fn walk(msg: Msg, mut buf: &[u8], depth: usize) -> Result<u64, BudgetError> {
    if depth > MAX_DEPTH {
        return Err(BudgetError::Malformed("nested more than 100 levels deep"));
    }
    let mut total = 2 * msg.size();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let field =
            u32::try_from(key >> 3).map_err(|_| BudgetError::Malformed("bad field number"))?;
        total = total.saturating_add(2 * FIELD_COST);
        match key & 7 {
            0 => {
                varint(&mut buf)?;
            }
            1 => buf = skip(buf, 8)?,
            5 => buf = skip(buf, 4)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?)
                    .map_err(|_| BudgetError::Malformed("length out of range"))?;
                let Some((body, rest)) = buf.split_at_checked(len) else {
                    return Err(BudgetError::Malformed("a field runs past the end"));
                };
                buf = rest;
                let cost = match msg.field(field) {
                    Field::Message(inner) => walk(inner, body, depth + 1)?,
                    Field::Packed32 => 4 * len as u64,
                    Field::Bytes => len as u64,
                };
                total = total.saturating_add(cost);
            }
            // Groups (3, 4) are proto2 only; prost refuses them in these messages too.
            _ => return Err(BudgetError::Malformed("unsupported wire type")),
        }
    }
    Ok(total)
}

/// What a decoded request holds while it is processed, for the executor's budget of requests in
/// flight (`--max-inflight-bytes`): every message's struct and every string's, byte field's
/// and packed field's contents, by the same measure as [`estimate`] but counted once (the
/// `Vec`s have stopped growing). Returns the bytes and the number of documents at any depth,
/// each of which may get an embedding in the reply.
pub fn held(req: &DataRequestProto) -> (u64, u64) {
    use crate::protocol::jina::data_request_proto::data_content_proto::Documents;
    use std::mem::size_of;
    let mut h = Held::default();
    h.bytes += size_of::<DataRequestProto>() as u64;
    if let Some(header) = &req.header {
        h.str(&header.request_id);
        h.str(header.exec_endpoint.as_deref().unwrap_or_default());
        h.str(header.target_executor.as_deref().unwrap_or_default());
        h.status(header.status.as_ref());
    }
    h.strct(req.parameters.as_ref());
    for r in &req.routes {
        h.bytes += size_of::<RouteProto>() as u64;
        h.str(&r.executor);
        h.status(r.status.as_ref());
    }
    match req.data.as_ref().and_then(|d| d.documents.as_ref()) {
        Some(Documents::Docs(da)) => da.docs.iter().for_each(|d| h.doc(d)),
        Some(Documents::DocsBytes(b)) => h.bytes += b.len() as u64,
        None => {}
    }
    (h.bytes, h.docs)
}

/// [`held`]'s running sums.
#[derive(Default)]
struct Held {
    bytes: u64,
    docs: u64,
}

impl Held {
    fn str(&mut self, s: &str) {
        self.bytes += s.len() as u64;
    }

    fn status(&mut self, s: Option<&StatusProto>) {
        let Some(s) = s else { return };
        self.str(&s.description);
        if let Some(e) = &s.exception {
            self.bytes += std::mem::size_of::<ExceptionProto>() as u64;
            self.str(&e.name);
            self.str(&e.executor);
            for a in e.args.iter().chain(&e.stacks) {
                self.bytes += std::mem::size_of::<String>() as u64;
                self.str(a);
            }
        }
    }

    fn strct(&mut self, s: Option<&prost_types::Struct>) {
        let Some(s) = s else { return };
        let entry = std::mem::size_of::<String>() + std::mem::size_of::<prost_types::Value>();
        for (k, v) in &s.fields {
            self.bytes += entry as u64;
            self.str(k);
            self.value(v);
        }
    }

    fn value(&mut self, v: &prost_types::Value) {
        use prost_types::value::Kind;
        match &v.kind {
            Some(Kind::StringValue(s)) => self.str(s),
            Some(Kind::StructValue(s)) => {
                self.bytes += std::mem::size_of::<prost_types::Struct>() as u64;
                self.strct(Some(s));
            }
            Some(Kind::ListValue(l)) => {
                self.bytes += std::mem::size_of::<prost_types::ListValue>() as u64;
                for v in &l.values {
                    self.bytes += std::mem::size_of::<prost_types::Value>() as u64;
                    self.value(v);
                }
            }
            _ => {}
        }
    }

    fn dense(&mut self, d: Option<&DenseNdArrayProto>) {
        let Some(d) = d else { return };
        self.bytes += d.buffer.len() as u64 + 4 * d.shape.len() as u64;
        self.str(&d.dtype);
    }

    fn ndarray(&mut self, a: Option<&NdArrayProto>) {
        use crate::protocol::docarray::nd_array_proto::Content;
        let Some(a) = a else { return };
        self.bytes += std::mem::size_of::<NdArrayProto>() as u64;
        self.str(&a.cls_name);
        self.strct(a.parameters.as_ref());
        match &a.content {
            Some(Content::Dense(d)) => self.dense(Some(d)),
            Some(Content::Sparse(s)) => {
                self.bytes += std::mem::size_of::<SparseNdArrayProto>() as u64;
                self.bytes += 4 * s.shape.len() as u64;
                self.dense(s.indices.as_ref());
                self.dense(s.values.as_ref());
            }
            None => {}
        }
    }

    fn scores(&mut self, m: &std::collections::HashMap<String, NamedScoreProto>) {
        let entry = std::mem::size_of::<String>() + std::mem::size_of::<NamedScoreProto>();
        for (k, s) in m {
            self.bytes += entry as u64;
            self.str(k);
            self.str(&s.op_name);
            self.str(&s.description);
            self.str(&s.ref_id);
        }
    }

    fn doc(&mut self, d: &DocumentProto) {
        use crate::protocol::docarray::document_proto::Content;
        self.docs += 1;
        self.bytes += std::mem::size_of::<DocumentProto>() as u64;
        for s in [&d.id, &d.parent_id, &d.uri, &d.modality, &d.mime_type] {
            self.str(s);
        }
        match &d.content {
            Some(Content::Blob(b)) => self.bytes += b.len() as u64,
            Some(Content::Text(t)) => self.str(t),
            Some(Content::Tensor(t)) => self.ndarray(Some(t)),
            None => {}
        }
        self.bytes += 4 * d.location.len() as u64;
        self.ndarray(d.embedding.as_ref());
        self.strct(d.tags.as_ref());
        self.strct(d.metadata.as_ref());
        self.scores(&d.scores);
        self.scores(&d.evaluations);
        for c in d.chunks.iter().chain(&d.matches) {
            self.doc(c);
        }
    }
}

fn skip(buf: &[u8], n: usize) -> Result<&[u8], BudgetError> {
    buf.get(n..)
        .ok_or(BudgetError::Malformed("a field runs past the end"))
}

fn varint(buf: &mut &[u8]) -> Result<u64, BudgetError> {
    let mut v = 0u64;
    for i in 0..10 {
        let Some((&b, rest)) = buf.split_first() else {
            return Err(BudgetError::Malformed("a varint runs past the end"));
        };
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(BudgetError::Malformed("a varint longer than ten bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::docarray::document_proto::Content;
    use prost::Message;

    fn request(docs: Vec<DocumentProto>) -> DataRequestProto {
        DataRequestProto {
            data: Some(DataContentProto {
                documents: Some(
                    crate::protocol::jina::data_request_proto::data_content_proto::Documents::Docs(
                        DocumentArrayProto { docs },
                    ),
                ),
            }),
            ..Default::default()
        }
    }

    /// Empty documents cost at least their decoded struct each, hundreds of times their wire
    /// size; a request of real content (an image blob) costs about its wire size.
    #[test]
    fn empty_documents_cost_their_decoded_size() {
        let n = 10_000;
        let empty = request(vec![DocumentProto::default(); n]).encode_to_vec();
        let e = estimate(Root::DataRequest, &empty).expect("estimate");
        let floor = (n * std::mem::size_of::<DocumentProto>()) as u64;
        assert!(e >= floor, "{e} < {floor}");
        assert!(
            e > 100 * empty.len() as u64,
            "{e} vs {} wire bytes",
            empty.len()
        );

        let blob = DocumentProto {
            content: Some(Content::Blob(vec![7u8; 4 << 20].into())),
            ..Default::default()
        };
        let image = request(vec![blob]).encode_to_vec();
        let e = estimate(Root::DataRequest, &image).expect("estimate");
        assert!(
            e >= image.len() as u64 && e < image.len() as u64 + 4096,
            "{e}"
        );
    }

    /// Nested documents, tags and scores are walked, not taken as opaque bytes.
    #[test]
    fn nested_content_is_counted() {
        let chunks = vec![DocumentProto::default(); 1000];
        let mut tags = prost_types::Struct::default();
        let list = prost_types::ListValue {
            values: vec![prost_types::Value::default(); 1000],
        };
        tags.fields.insert(
            "l".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::ListValue(list)),
            },
        );
        let doc = DocumentProto {
            chunks,
            tags: Some(tags),
            ..Default::default()
        };
        let wire = request(vec![doc]).encode_to_vec();
        let e = estimate(Root::DataRequest, &wire).expect("estimate");
        let floor = 1000 * std::mem::size_of::<DocumentProto>()
            + 1000 * std::mem::size_of::<prost_types::Value>();
        assert!(e >= floor as u64, "{e} < {floor}");
    }

    /// What a decoded request holds is what its wire form was estimated to cost, counted once:
    /// never more than the estimate, never far below it, whatever the request is made of.
    #[test]
    fn held_agrees_with_the_estimate() {
        let mut tags = prost_types::Struct::default();
        let list = prost_types::ListValue {
            values: vec![
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("v".repeat(10))),
                };
                500
            ],
        };
        tags.fields.insert(
            "l".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::ListValue(list)),
            },
        );
        let text = |i: usize| DocumentProto {
            id: format!("doc-{i}"),
            content: Some(Content::Text("a caption of some words".into())),
            ..Default::default()
        };
        let shapes: Vec<(&str, Vec<DocumentProto>)> = vec![
            ("empty", vec![DocumentProto::default(); 5000]),
            ("texts", (0..2000).map(text).collect()),
            (
                "blobs",
                vec![
                    DocumentProto {
                        content: Some(Content::Blob(vec![1u8; 1 << 20].into())),
                        ..Default::default()
                    };
                    4
                ],
            ),
            (
                "nested",
                vec![DocumentProto {
                    chunks: (0..300).map(text).collect(),
                    tags: Some(tags),
                    ..Default::default()
                }],
            ),
        ];
        for (name, docs) in shapes {
            let n = docs.len();
            let req = request(docs);
            let e = estimate(Root::DataRequest, &req.encode_to_vec()).expect("estimate");
            let (h, d) = held(&req);
            assert!(h <= e && 3 * h >= e, "{name}: held {h}, estimate {e}");
            assert!(d >= n as u64, "{name}: {d} documents");
        }
    }

    /// Over the budget is refused, naming the flag; truncated and over-deep input is
    /// malformed; a message type other than the requests is not checked.
    #[test]
    fn over_budget_and_malformed_are_refused() {
        let wire = request(vec![DocumentProto::default(); 1000]).encode_to_vec();
        let e = estimate(Root::DataRequest, &wire).expect("estimate");
        assert_eq!(check_against(Root::DataRequest, &wire, e), Ok(()));
        let err = check_against(Root::DataRequest, &wire, e - 1).expect_err("over budget");
        assert!(err.to_string().contains("--max-decoded-bytes"), "{err}");
        assert!(matches!(
            estimate(Root::DataRequest, &wire[..wire.len() - 1]),
            Err(BudgetError::Malformed(_))
        ));
        let mut deep = DocumentProto::default();
        for _ in 0..120 {
            deep = DocumentProto {
                chunks: vec![deep],
                ..Default::default()
            };
        }
        let wire = request(vec![deep]).encode_to_vec();
        assert_eq!(
            estimate(Root::DataRequest, &wire),
            Err(BudgetError::Malformed("nested more than 100 levels deep"))
        );
        assert_eq!(Root::of::<DataRequestProto>(), Some(Root::DataRequest));
        assert_eq!(Root::of::<HeaderProto>(), None);
    }
}
