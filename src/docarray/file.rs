//! docarray v1 files as Python writes them with `DocumentArray.save_binary(path, protocol=...,
//! compress=...)`, read as a stream of documents (a 100k-pair file is never held in memory).
//!
//! - `protobuf-array`: the whole file is one `DocumentArrayProto` (repeated field-1 records),
//!   optionally wrapped as one lz4-frame / gzip / bzip2 / xz stream (docarray writes zlib
//!   uncompressed for this protocol).
//! - `protobuf`: version byte 1, u64 big-endian count, then per document a u32 big-endian length
//!   and the (per-document compressed) `DocumentProto`.
//!
//! Files carry no magic of their own: like docarray, the protocol and compression come from the
//! file name's suffixes (`.protobuf`, `.protobuf-array`, `.lz4`, `.gzip`, `.zlib`, `.bz2`,
//! `.lzma`); where the name says nothing they are recognised from the first bytes. Unlike
//! docarray, the reader rejects what it cannot account for: an unknown version, a count that
//! does not match, trailing bytes, truncated records.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use prost::Message;

use super::proto::{document_proto, DocumentProto, NdArrayProto};
use super::spill::{Held, Spill, MEMORY_BUDGET};
use super::{image_source, DataError, ImageRef, ImageSource, Item, Labeled, Pair};

/// Largest single document accepted, so a corrupt length cannot ask for gigabytes.
pub const MAX_DOCUMENT_BYTES: u64 = 256 << 20;

/// What a document may take once decoded, beyond twice its stored size: real content (texts,
/// blobs, tensors, a few chunks and tags) decodes to about its stored size, while a record of
/// empty chunks decodes to some 200 times it (a 40 KB gzipped upload of them asked for 14 GB).
const DECODED_ALLOWANCE: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    ProtobufArray,
    Protobuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Lz4,
    Gzip,
    Zlib,
    Bz2,
    Lzma,
}

/// Protocol and compression named by the file's suffixes, as docarray's
/// `protocol_and_compress_from_file_path` reads them.
pub fn from_file_name(path: &Path) -> (Option<Protocol>, Option<Compression>) {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let (mut p, mut c) = (None, None);
    for part in name.split('.').skip(1) {
        match part {
            "protobuf" => p = Some(Protocol::Protobuf),
            "protobuf-array" => p = Some(Protocol::ProtobufArray),
            "lz4" => c = Some(Compression::Lz4),
            "gzip" => c = Some(Compression::Gzip),
            "zlib" => c = Some(Compression::Zlib),
            "bz2" => c = Some(Compression::Bz2),
            "lzma" => c = Some(Compression::Lzma),
            _ => {}
        }
    }
    (p, c)
}

fn sniff_compression(head: &[u8]) -> Option<Compression> {
    if head.starts_with(&[0x04, 0x22, 0x4d, 0x18]) {
        Some(Compression::Lz4)
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Some(Compression::Gzip)
    } else if head.starts_with(b"BZh") {
        Some(Compression::Bz2)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Some(Compression::Lzma)
    } else if head.len() >= 2
        && head[0] == 0x78
        && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0
    {
        Some(Compression::Zlib)
    } else {
        None
    }
}

fn decompressor<'a>(c: Option<Compression>, r: impl Read + 'a) -> Box<dyn Read + 'a> {
    match c {
        None => Box::new(r),
        Some(Compression::Lz4) => Box::new(lz4_flex::frame::FrameDecoder::new(r)),
        Some(Compression::Gzip) => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Some(Compression::Zlib) => Box::new(flate2::read::ZlibDecoder::new(r)),
        Some(Compression::Bz2) => Box::new(bzip2::read::MultiBzDecoder::new(r)),
        Some(Compression::Lzma) => Box::new(xz2::read::XzDecoder::new_multi_decoder(r)),
    }
}

enum Framing {
    /// Repeated field-1 records of a DocumentArrayProto.
    Array,
    /// `remaining` documents still to read, each with a u32 BE length.
    Stream {
        remaining: u64,
        compression: Option<Compression>,
    },
}

/// Documents of a docarray v1 file, in order.
pub struct DocReader {
    path: PathBuf,
    reader: Box<dyn Read>,
    framing: Framing,
    index: usize,
    done: bool,
    unpacked: u64,
}

impl DocReader {
    /// Opens `path`, with protocol and compression from its name or, failing that, its bytes.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let io = |e: std::io::Error| DataError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let (named_protocol, named_compression) = from_file_name(path);
        let mut head = [0u8; 9];
        let n = {
            let mut f = File::open(path).map_err(io)?;
            read_up_to(&mut f, &mut head).map_err(io)?
        };
        let head = &head[..n];
        let protocol = named_protocol.unwrap_or(if head.first() == Some(&0x01) {
            Protocol::Protobuf
        } else {
            Protocol::ProtobufArray
        });
        let mut file = BufReader::with_capacity(1 << 16, File::open(path).map_err(io)?);
        let bad = |msg: String| DataError::Malformed {
            location: path.display().to_string(),
            msg,
        };
        let (reader, framing): (Box<dyn Read>, Framing) = match protocol {
            Protocol::ProtobufArray => {
                // docarray writes protobuf-array+zlib uncompressed; accept a real zlib stream too.
                let c = match named_compression {
                    Some(Compression::Zlib) => {
                        sniff_compression(head).filter(|c| *c == Compression::Zlib)
                    }
                    Some(c) => Some(c),
                    None => sniff_compression(head),
                };
                (decompressor(c, file), Framing::Array)
            }
            Protocol::Protobuf => {
                let mut header = [0u8; 9];
                file.read_exact(&mut header)
                    .map_err(|_| bad("shorter than the 9-byte protobuf stream header".into()))?;
                if header[0] != 1 {
                    return Err(bad(format!(
                        "unknown protobuf stream version {}",
                        header[0]
                    )));
                }
                let count = u64::from_be_bytes(header[1..9].try_into().expect("8 bytes"));
                (
                    Box::new(file),
                    Framing::Stream {
                        remaining: count,
                        compression: named_compression,
                    },
                )
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            framing,
            index: 0,
            done: false,
            unpacked: 0,
        })
    }

    /// The bytes of the documents read so far, decompressed: what a compressed file really
    /// holds.
    pub fn unpacked(&self) -> u64 {
        self.unpacked
    }

    fn location(&self) -> String {
        format!("{} document {}", self.path.display(), self.index)
    }

    fn malformed(&self, msg: impl Into<String>) -> DataError {
        DataError::Malformed {
            location: self.location(),
            msg: msg.into(),
        }
    }

    fn next_record(&mut self) -> Result<Option<Vec<u8>>, DataError> {
        match &mut self.framing {
            Framing::Array => {
                let Some(tag) = read_varint(&mut self.reader).map_err(|e| self.malformed(e))?
                else {
                    return Ok(None);
                };
                if tag != 0x0a {
                    return Err(self.malformed(format!(
                        "expected a DocumentArrayProto record, found tag {tag:#x}"
                    )));
                }
                let len = read_varint(&mut self.reader)
                    .map_err(|e| self.malformed(e))?
                    .ok_or_else(|| self.malformed("file ends inside a record header"))?;
                self.read_exact_record(len).map(Some)
            }
            Framing::Stream {
                remaining,
                compression,
            } => {
                let compression = *compression;
                if *remaining == 0 {
                    let mut probe = [0u8; 1];
                    return match read_up_to(&mut self.reader, &mut probe) {
                        Ok(0) => Ok(None),
                        Ok(_) => {
                            Err(self
                                .malformed("bytes after the last document the header announced"))
                        }
                        Err(e) => Err(self.malformed(e.to_string())),
                    };
                }
                *remaining -= 1;
                let mut len = [0u8; 4];
                self.reader.read_exact(&mut len).map_err(|_| {
                    self.malformed("file ends before the documents the header announced")
                })?;
                let raw = self.read_exact_record(u32::from_be_bytes(len) as u64)?;
                let c = compression.or_else(|| sniff_compression(&raw));
                if c.is_none() {
                    return Ok(Some(raw));
                }
                let mut out = Vec::new();
                decompressor(c, &raw[..])
                    .take(MAX_DOCUMENT_BYTES + 1)
                    .read_to_end(&mut out)
                    .map_err(|e| self.malformed(format!("cannot decompress: {e}")))?;
                Ok(Some(out))
            }
        }
    }

    fn read_exact_record(&mut self, len: u64) -> Result<Vec<u8>, DataError> {
        if len > MAX_DOCUMENT_BYTES {
            return Err(self.malformed(format!(
                "record of {len} bytes is over the {MAX_DOCUMENT_BYTES}-byte limit"
            )));
        }
        let mut buf = vec![0u8; len as usize];
        self.reader.read_exact(&mut buf).map_err(|e| {
            self.malformed(format!("truncated record ({len} bytes announced): {e}"))
        })?;
        Ok(buf)
    }
}

impl DocReader {
    /// Decodes one record, once its wire form shows it decodes to a sane size.
    fn decode(&self, record: &[u8]) -> Result<DocumentProto, DataError> {
        use crate::protocol::budget::{estimate, Root};
        let stored = record.len() as u64;
        let limit = 2 * stored + DECODED_ALLOWANCE;
        let need = estimate(Root::Document, record)
            .map_err(|e| self.malformed(format!("not a DocumentProto: {e}")))?;
        if need > limit {
            return Err(self.malformed(format!(
                "the document would take about {need} bytes once decoded from {stored} stored \
                 (at most {limit}): it holds too many empty fields"
            )));
        }
        DocumentProto::decode(record)
            .map_err(|e| self.malformed(format!("not a DocumentProto: {e}")))
    }
}

impl Iterator for DocReader {
    type Item = Result<DocumentProto, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let record = match self.next_record() {
            Ok(Some(r)) => {
                self.unpacked += r.len() as u64;
                r
            }
            Ok(None) => {
                self.done = true;
                return None;
            }
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        let doc = self.decode(&record);
        if doc.is_err() {
            self.done = true;
        }
        self.index += 1;
        Some(doc)
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A protobuf varint; `Ok(None)` at a clean end of input.
fn read_varint(r: &mut impl Read) -> Result<Option<u64>, String> {
    let mut value = 0u64;
    for i in 0..10 {
        let mut b = [0u8; 1];
        match r.read(&mut b) {
            Ok(0) if i == 0 => return Ok(None),
            Ok(0) => return Err("file ends inside a varint".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
        value |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            return Ok(Some(value));
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// The label in `tags['finetuner_label']` as text: strings as they are, numbers as docarray
/// reads them back (integers lose nothing: `1.0` becomes "1").
pub fn finetuner_label(doc: &DocumentProto) -> Option<String> {
    use prost_types::value::Kind;
    let v = doc.tags.as_ref()?.fields.get("finetuner_label")?;
    match v.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        Kind::NumberValue(n) if n.fract() == 0.0 && n.abs() < 1e15 => {
            Some(format!("{}", *n as i64))
        }
        Kind::NumberValue(n) => Some(n.to_string()),
        Kind::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The image a document carries (blob, tensor or uri), if any.
pub fn doc_image(
    doc: &DocumentProto,
    base: &Path,
    location: &str,
) -> Result<Option<ImageRef>, String> {
    let source = match &doc.content {
        Some(document_proto::Content::Blob(b)) => Some(ImageSource::Blob(Held::Memory(b.to_vec()))),
        Some(document_proto::Content::Tensor(t)) => Some(pixels(t)?),
        _ if !doc.uri.is_empty() => Some(image_source(&doc.uri, base)),
        _ => None,
    };
    Ok(source.map(|source| ImageRef {
        source,
        location: location.to_string(),
    }))
}

/// A document's text: its text content, or "" for a text-modality document whose text was empty
/// (docarray does not write empty fields).
pub fn doc_text(doc: &DocumentProto) -> Option<String> {
    match &doc.content {
        Some(document_proto::Content::Text(t)) => Some(t.clone()),
        None if doc.modality == "text" && doc.uri.is_empty() => Some(String::new()),
        _ => None,
    }
}

/// An image tensor as [`crate::protocol::ndarray::image_pixels`] reads it.
fn pixels(t: &NdArrayProto) -> Result<ImageSource, String> {
    let (data, height, width, channels) = crate::protocol::ndarray::image_pixels(t)?;
    Ok(ImageSource::Pixels {
        data: Held::Memory(data),
        height,
        width,
        channels,
    })
}

/// The documents of `path`, each with its location for error messages.
fn located(
    path: &Path,
) -> Result<impl Iterator<Item = Result<(String, DocumentProto), DataError>>, DataError> {
    let name = path.display().to_string();
    Ok(DocReader::open(path)?
        .enumerate()
        .map(move |(i, doc)| doc.map(|d| (format!("{name} document {i}"), d))))
}

/// Training pairs from parent documents with a text chunk and an image chunk; their images'
/// bytes beyond [`MEMORY_BUDGET`] spilled to disk, beside `path`.
pub fn pairs(path: &Path) -> Result<impl Iterator<Item = Result<Pair, DataError>>, DataError> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut spill = Spill::new(MEMORY_BUDGET, &base);
    Ok(located(path)?.map(move |item| {
        let (location, doc) = item?;
        let bad = |msg: String| DataError::Malformed {
            location: location.clone(),
            msg,
        };
        let mut caption = None;
        let mut image = None;
        for c in &doc.chunks {
            if image.is_none() && c.modality != "text" {
                if let Some(img) = doc_image(c, &base, &location).map_err(bad)? {
                    image = Some(img);
                    continue;
                }
            }
            if caption.is_none() {
                caption = doc_text(c);
            }
        }
        match (caption, image) {
            (Some(caption), Some(image)) => Ok(Pair {
                caption,
                image: image.kept(&mut spill)?,
                label: finetuner_label(&doc),
            }),
            _ => Err(bad(format!(
                "document {} needs a text chunk and an image chunk (found {} chunks)",
                super::quoted(&doc.id),
                doc.chunks.len()
            ))),
        }
    }))
}

/// Labelled query (text) or index (image) items; the images' bytes beyond [`MEMORY_BUDGET`]
/// spilled to disk, beside `path`.
pub fn labeled(
    path: &Path,
    want: super::Modality,
) -> Result<impl Iterator<Item = Result<Labeled, DataError>>, DataError> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut spill = Spill::new(MEMORY_BUDGET, &base);
    Ok(located(path)?.map(move |item| {
        let (location, doc) = item?;
        let bad = |msg: String| DataError::Malformed {
            location: location.clone(),
            msg,
        };
        let label =
            finetuner_label(&doc).ok_or_else(|| bad("no tags['finetuner_label']".into()))?;
        let item = match want {
            super::Modality::Text => {
                Item::Text(doc_text(&doc).ok_or_else(|| bad("not a text document".into()))?)
            }
            super::Modality::Image => Item::Image(
                doc_image(&doc, &base, &location)
                    .map_err(&bad)?
                    .ok_or_else(|| bad("not an image document".into()))?
                    .kept(&mut spill)?,
            ),
        };
        let id = if doc.id.is_empty() {
            location.clone()
        } else {
            doc.id.clone()
        };
        let uri = Some(doc.uri.clone()).filter(|u| !u.is_empty());
        Ok(Labeled {
            id,
            item,
            label,
            uri,
        })
    }))
}
