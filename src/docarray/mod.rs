//! Documents on disk: the datasets users bring (Finetuner-style CSV, docarray v1 files) read as
//! streams of training pairs or labelled items, with images referenced lazily.

pub mod csv;
pub mod file;
pub mod proto;
pub mod remote;
pub mod spill;

use std::path::{Path, PathBuf};

use crate::model::{ImagePreprocessor, ModelError};
pub use remote::{HttpFetch, ImageHosts};
pub use spill::{Held, Spill};

/// `s` quoted for an error message, cut to its first 200 characters: messages that quote
/// data a client sent travel back in statuses and are kept in run records and logs, and a
/// 70 MB document id made a run record too large for any reply.
pub fn quoted(s: &str) -> String {
    const MAX: usize = 200;
    match s.char_indices().nth(MAX) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes in all)", &s[..cut], s.len()),
    }
}

/// `s` cut to at most `max` bytes at a character boundary, saying how much was cut: for
/// messages and log lines that carry what a client sent, which no reply or record can hold
/// whole when it is megabytes.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut at = max;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    format!("{}... ({} more bytes cut)", &s[..at], s.len() - at)
}

/// Where an error in a dataset is: file and line or document index.
pub type Location = String;

/// An image as a dataset gives it; decoded only when used.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    /// A local file (already resolved against the dataset's folder).
    Path(PathBuf),
    /// A `data:` URI.
    DataUri(String),
    /// A remote URI (http, https), fetched when used (size and time limited).
    Remote(String),
    /// Encoded bytes (docarray `blob`).
    Blob(Held),
    /// Raw pixels `[height, width, channels]`, uint8 (docarray `tensor`).
    Pixels {
        data: Held,
        height: usize,
        width: usize,
        channels: usize,
    },
}

impl ImageSource {
    /// The image bytes it holds in memory (blobs and pixels; references hold none).
    pub fn held_bytes(&self) -> usize {
        match self {
            ImageSource::Blob(b) => b.in_memory(),
            ImageSource::Pixels { data, .. } => data.in_memory(),
            _ => 0,
        }
    }
}

/// An image and where it came from, for error messages.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRef {
    pub source: ImageSource,
    pub location: Location,
}

impl ImageRef {
    /// Decodes and preprocesses the image, fetching a remote one as `http` allows; errors name
    /// the dataset location.
    pub fn preprocess(
        &self,
        pre: &ImagePreprocessor,
        http: &HttpFetch,
    ) -> Result<Vec<f32>, DataError> {
        if let ImageSource::Pixels {
            data,
            height,
            width,
            channels,
        } = &self.source
        {
            let data = data.bytes().map_err(|e| self.unreadable(e))?;
            return pre
                .preprocess_hwc_u8(&data, *height, *width, *channels)
                .map_err(|e| self.error(e));
        }
        pre.preprocess_bytes(&self.encoded(pre, http)?)
            .map_err(|e| self.error(e))
    }

    /// Checks that the image can be trained on (readable, decodable, within the pixel limit)
    /// without resizing it, so a bad image is found before training instead of at its batch.
    /// Remote URIs are checked when they are fetched for training.
    pub fn check(&self, pre: &ImagePreprocessor) -> Result<(), DataError> {
        match &self.source {
            ImageSource::Remote(_) => Ok(()),
            ImageSource::Pixels { .. } => self.preprocess(pre, &HttpFetch::DATASET).map(drop),
            _ => pre
                .decode(&self.encoded(pre, &HttpFetch::DATASET)?)
                .map(drop)
                .map_err(|e| self.error(e)),
        }
    }

    /// The encoded image bytes (not for `Pixels`, which are decoded already); a file only when
    /// it is a regular file within what `pre`'s pixel limit allows.
    fn encoded(
        &self,
        pre: &ImagePreprocessor,
        http: &HttpFetch,
    ) -> Result<std::borrow::Cow<'_, [u8]>, DataError> {
        let at = |msg: String| DataError::Image {
            location: self.location.clone(),
            msg,
        };
        match &self.source {
            ImageSource::Path(p) => pre
                .read_file(p)
                .map(Into::into)
                .map_err(|e| at(format!("cannot read {}: {e}", p.display()))),
            ImageSource::DataUri(uri) => decode_data_uri(uri).map(Into::into).map_err(at),
            ImageSource::Remote(uri) => http.get(uri).map(Into::into).map_err(at),
            ImageSource::Blob(b) => b.bytes().map_err(|e| self.unreadable(e)),
            ImageSource::Pixels { .. } => Err(at("raw pixels have no encoded form".into())),
        }
    }

    /// A spilled image that could not be read back.
    fn unreadable(&self, e: std::io::Error) -> DataError {
        DataError::Image {
            location: self.location.clone(),
            msg: format!("cannot read the image back from the spill file: {e}"),
        }
    }

    /// The image as `spill` keeps it: blobs and pixels in memory or spilled, the rest as is.
    pub fn kept(self, spill: &mut Spill) -> Result<ImageRef, DataError> {
        let keep = |h: Held, spill: &mut Spill| {
            spill.keep(h).map_err(|e| DataError::Image {
                location: self.location.clone(),
                msg: format!("cannot spill the image to disk (TMPDIR): {e}"),
            })
        };
        let source = match self.source {
            ImageSource::Blob(b) => ImageSource::Blob(keep(b, spill)?),
            ImageSource::Pixels {
                data,
                height,
                width,
                channels,
            } => ImageSource::Pixels {
                data: keep(data, spill)?,
                height,
                width,
                channels,
            },
            other => other,
        };
        Ok(ImageRef {
            source,
            location: self.location,
        })
    }

    fn error(&self, e: ModelError) -> DataError {
        let msg = match e {
            // The location already says it is an image.
            ModelError::Image { msg } => msg,
            other => other.to_string(),
        };
        DataError::Image {
            location: self.location.clone(),
            msg,
        }
    }
}

/// Checks every image (in parallel) before any training or upload; the error is the first bad
/// image in dataset order, with its file and line.
pub fn check_images(images: &[&ImageRef], pre: &ImagePreprocessor) -> Result<(), DataError> {
    use rayon::prelude::*;
    match images.par_iter().find_map_first(|i| i.check(pre).err()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Header words a Finetuner-style CSV row would not hold as data.
const HEADER_WORDS: &[&str] = &[
    "text", "caption", "image", "img", "label", "query", "uri", "url", "path", "file", "filename",
    "class", "category", "tag", "id",
];

/// What a dataset may hold beyond well-formed rows and decodable images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vetting {
    /// Bytes a docarray file's documents may unpack to: its compression can turn kilobytes
    /// into gigabytes.
    pub max_unpacked: u64,
    /// Whether a document's `uri` may name a file on this machine. Not for data sent from
    /// elsewhere: it would have the receiver read (and train on) any file on its disk.
    pub local_files: bool,
}

impl Vetting {
    /// The user's own data on the user's own machine.
    pub const LOCAL: Vetting = Vetting {
        max_unpacked: u64::MAX,
        local_files: true,
    };
}

/// Images checked together while a dataset is vetted: enough to keep every core busy, few
/// enough that only this many (or this many bytes of blobs and pixels) are held at once,
/// however large the dataset.
const CHECK_CHUNK: usize = 64;
const CHECK_CHUNK_BYTES: usize = 256 << 20;

/// Vets a whole dataset file before it is trained on or pushed, whatever role it will play:
/// every row has the shape Finetuner's CSV has (two or three columns, no header row), every
/// image is readable and decodes within the pixel limit, and the data is within `vetting`.
/// Streams: images are checked a chunk at a time, in dataset order. Returns the number of rows
/// (CSV) or documents (docarray). Errors name the file and line or document.
pub fn validate_dataset(
    path: &Path,
    pre: &ImagePreprocessor,
    vetting: Vetting,
) -> Result<u64, DataError> {
    let mut images = Vec::new();
    let mut items = 0u64;
    let flush = |images: &mut Vec<ImageRef>, all: bool| {
        let held: usize = images.iter().map(|i| i.source.held_bytes()).sum();
        if images.len() < CHECK_CHUNK && held < CHECK_CHUNK_BYTES && !all {
            return Ok(());
        }
        let refs: Vec<&ImageRef> = images.iter().collect();
        let checked = check_images(&refs, pre);
        images.clear();
        checked
    };
    if is_csv(path) {
        let rows = csv::CsvRows::open(path)?;
        let base = rows.base().to_path_buf();
        let mut first: Option<(String, Vec<String>, bool)> = None;
        for row in rows.rows() {
            let (loc, fields) = row?;
            let mut has_image = false;
            for f in &fields {
                if looks_like_image(f, &base) {
                    has_image = true;
                    images.push(ImageRef {
                        source: image_source(f, &base),
                        location: loc.clone(),
                    });
                }
            }
            flush(&mut images, false)?;
            match &first {
                None => first = Some((loc, fields, has_image)),
                Some((at, head, head_image)) => {
                    let words = head
                        .iter()
                        .all(|h| HEADER_WORDS.contains(&h.trim().to_ascii_lowercase().as_str()));
                    if items == 1 && ((has_image && !head_image) || words) {
                        return Err(DataError::Malformed {
                            location: at.clone(),
                            msg: format!(
                                "{} looks like a header row; Finetuner-style CSVs have none: remove it",
                                quoted(&head.join(","))
                            ),
                        });
                    }
                }
            }
            items += 1;
        }
    } else {
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut docs = file::DocReader::open(path)?;
        let mut i = 0usize;
        while let Some(doc) = docs.next() {
            let doc = doc?;
            let loc = format!("{} document {i}", path.display());
            let bad = |msg: String| DataError::Malformed {
                location: loc.clone(),
                msg,
            };
            if docs.unpacked() > vetting.max_unpacked {
                return Err(DataError::TooLarge {
                    location: loc,
                    limit: vetting.max_unpacked,
                });
            }
            for d in std::iter::once(&doc).chain(&doc.chunks) {
                let image = file::doc_image(d, &base, &loc).map_err(bad)?;
                if let Some(ImageRef {
                    source: ImageSource::Path(_),
                    ..
                }) = &image
                {
                    if !vetting.local_files {
                        return Err(bad(
                            "an image uri names a local file; send the image itself (blob or \
                             tensor) or an http(s) URI"
                                .into(),
                        ));
                    }
                }
                images.extend(image);
            }
            flush(&mut images, false)?;
            items += 1;
            i += 1;
        }
    }
    flush(&mut images, true)?;
    Ok(items)
}

/// The bytes of a `data:[<mime>][;base64],<data>` URI.
pub fn decode_data_uri(uri: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let rest = uri.strip_prefix("data:").ok_or("not a data: URI")?;
    let (meta, data) = rest.split_once(',').ok_or("data: URI without a comma")?;
    if meta.ends_with(";base64") {
        base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| format!("bad base64 in data: URI: {e}"))
    } else {
        Ok(percent_decode(data))
    }
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn is_csv(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

/// Training pairs from a CSV (by extension) or a docarray v1 file, streamed.
pub fn open_pairs(
    path: &Path,
) -> Result<Box<dyn Iterator<Item = Result<Pair, DataError>>>, DataError> {
    if is_csv(path) {
        Ok(Box::new(csv::CsvRows::open(path)?.pairs()))
    } else {
        Ok(Box::new(file::pairs(path)?))
    }
}

/// Labelled query (text) or index (image) items from a CSV or a docarray v1 file.
pub fn read_labeled(path: &Path, want: Modality) -> Result<Vec<Labeled>, DataError> {
    open_labeled(path, want)?.collect()
}

/// [`read_labeled`] one item at a time.
pub fn open_labeled(
    path: &Path,
    want: Modality,
) -> Result<Box<dyn Iterator<Item = Result<Labeled, DataError>>>, DataError> {
    if is_csv(path) {
        Ok(Box::new(csv::CsvRows::open(path)?.labeled(want)))
    } else {
        Ok(Box::new(file::labeled(path, want)?))
    }
}

/// One training example: a caption and its image.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub caption: String,
    pub image: ImageRef,
    pub label: Option<String>,
}

/// What a labelled item is.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Text(String),
    Image(ImageRef),
}

/// A query or index item with its `finetuner_label`.
#[derive(Debug, Clone, PartialEq)]
pub struct Labeled {
    pub id: String,
    pub item: Item,
    pub label: String,
    /// The document's `uri` where the item holds its image itself (a blob loaded from that
    /// file when the dataset was pushed): how example results name it.
    pub uri: Option<String>,
}

/// Which modality a labelled dataset should provide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    Text,
    Image,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{location}: {msg}")]
    Malformed { location: Location, msg: String },
    #[error("{location}: image: {msg}")]
    Image { location: Location, msg: String },
    /// The data unpacks to more than it may (a compressed file's real size).
    #[error("{location}: the documents unpack to more than {limit} bytes")]
    TooLarge { location: Location, limit: u64 },
}

/// Treats a dataset cell as an image reference (Finetuner's `is_uri`, made stricter so captions
/// are not mistaken for paths): a `data:image/`, `file://` or http(s) URI, a path to an existing
/// file (relative to `base`), or a path with an image extension and no whitespace (images load
/// lazily, so the file need not exist yet).
pub fn looks_like_image(s: &str, base: &Path) -> bool {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    if lower.starts_with("data:image/") || lower.starts_with("file://") {
        return true;
    }
    let path_part = lower.split(['?', '#']).next().unwrap_or("");
    let image_ext = [".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"]
        .iter()
        .any(|e| path_part.ends_with(e));
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return image_ext;
    }
    if t.is_empty() || t.contains('\n') {
        return false;
    }
    let p = Path::new(t);
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    if p.is_file() {
        return true;
    }
    image_ext && !t.contains(char::is_whitespace)
}

/// Resolves an image string from a dataset whose own folder is `base`.
pub fn image_source(s: &str, base: &Path) -> ImageSource {
    let s = s.trim();
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("data:") {
        ImageSource::DataUri(s.to_string())
    } else if lower.starts_with("http://") || lower.starts_with("https://") {
        ImageSource::Remote(s.to_string())
    } else {
        let p = s.strip_prefix("file://").unwrap_or(s);
        let p = Path::new(p);
        ImageSource::Path(if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_cut() {
        assert_eq!(quoted("a \"b\""), r#""a \"b\"""#);
        let q = quoted(&"ü".repeat(70_000));
        assert!(q.starts_with(&format!("\"{}", "ü".repeat(200))), "{q}");
        assert!(!q.contains(&"ü".repeat(201)), "{q}");
        assert!(q.ends_with("... (140000 bytes in all)"), "{q}");
    }

    /// Spilled blobs and pixels preprocess as they did in memory.
    #[test]
    fn spilled_images_preprocess_as_in_memory() {
        let png = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/reference/images/rgb_224x224.png"),
        )
        .unwrap();
        let pre = ImagePreprocessor::new(crate::model::image::ImageConfig::default());
        let pixels: Vec<u8> = (0..30 * 40 * 3).map(|i| (i % 251) as u8).collect();
        let mut spill = Spill::new(0, &std::env::temp_dir());
        for source in [
            ImageSource::Blob(Held::Memory(png)),
            ImageSource::Pixels {
                data: Held::Memory(pixels),
                height: 30,
                width: 40,
                channels: 3,
            },
        ] {
            let memory = ImageRef {
                source,
                location: "x".into(),
            };
            let disk = memory.clone().kept(&mut spill).unwrap();
            assert_eq!(disk.source.held_bytes(), 0);
            assert!(memory.source.held_bytes() > 0);
            let http = HttpFetch::DATASET;
            assert_eq!(
                disk.preprocess(&pre, &http).unwrap(),
                memory.preprocess(&pre, &http).unwrap()
            );
        }
    }

    #[test]
    fn data_uris() {
        assert_eq!(
            decode_data_uri("data:text/plain;base64,aGk=").unwrap(),
            b"hi"
        );
        assert_eq!(decode_data_uri("data:,a%20b").unwrap(), b"a b");
        assert!(decode_data_uri("data:image/png;base64,@@@").is_err());
        assert!(decode_data_uri("nope").is_err());
    }

    #[test]
    fn image_detection() {
        let here = Path::new(".");
        assert!(looks_like_image("images/a.PNG", here));
        assert!(looks_like_image("https://x.org/a.jpg?x=1", here));
        assert!(looks_like_image("data:image/png;base64,AAAA", here));
        assert!(!looks_like_image("a red dress.png is nice", here));
        assert!(!looks_like_image("a red striped dress", here));
        assert!(looks_like_image(
            "Cargo.toml",
            Path::new(env!("CARGO_MANIFEST_DIR"))
        ));
        assert_eq!(
            image_source("a.png", Path::new("/d")),
            ImageSource::Path("/d/a.png".into())
        );
        assert_eq!(
            image_source("/x/a.png", Path::new("/d")),
            ImageSource::Path("/x/a.png".into())
        );
    }
}
