//! Named datasets: the trainer's store under `<data-dir>/datasets/<name>/`, and the client side
//! that packs a local dataset so the trainer needs none of the client's files.
//!
//! A docarray file travels as it is, unless its documents point at local image files by `uri`:
//! then those images are loaded into `blob`s first (Finetuner's `load_uri_to_blob`) and the file
//! is rewritten as a protobuf stream. A CSV travels as a zip bundle, `data.csv` plus every local
//! image it references under `images/`, with the cells rewritten to those relative paths; rows,
//! captions and labels stay as written, so the trainer reads the same rows the client would.
//!
//! Uploads land in a hidden temporary folder, are read through once (a dataset that does not
//! parse is refused with the file and document or line), and only then renamed into place.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use serde::{Deserialize, Serialize};

use crate::artifact::{is_safe_name, UnzipError};
use crate::docarray::csv::CsvRows;
use crate::docarray::file::DocReader;
use crate::docarray::proto::DocumentProto;
use crate::docarray::{image_source, looks_like_image, quoted, DataError, ImageSource, Vetting};
use crate::model::ImagePreprocessor;

/// How a dataset is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Docarray,
    CsvBundle,
}

/// What the store knows about one dataset (`dataset.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetMeta {
    pub name: String,
    pub format: Format,
    /// The data file, relative to the dataset's folder.
    pub file: String,
    pub bytes: u64,
    pub items: u64,
    pub created_unix: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset name {} is not allowed: use letters, digits, '-', '_' and '.', at most 128, not starting with '.'", quoted(.0))]
    BadName(String),
    #[error("dataset {0:?} does not exist")]
    NotFound(String),
    #[error("dataset {0:?} already exists (push with --overwrite to replace it)")]
    Exists(String),
    #[error("dataset is larger than the trainer's limit of {0} bytes")]
    TooLarge(u64),
    /// Storing more would leave the trainer's disk with less free space than it keeps.
    #[error("the trainer's disk would have less than {0} bytes free (--min-free-bytes); delete datasets or runs, or push less")]
    DiskFull(u64),
    #[error("dataset {name:?} is invalid: {msg}")]
    Invalid { name: String, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

const META: &str = "dataset.json";
const BUNDLE_CSV: &str = "data.csv";

/// The datasets under `<data-dir>/datasets`.
#[derive(Debug, Clone)]
pub struct DatasetStore {
    root: PathBuf,
    /// Largest upload accepted, in bytes (as sent; a bundle's unpacked size too).
    pub max_bytes: u64,
    /// Free space uploads leave on the data folder's disk. Each upload is bounded by
    /// `max_bytes`, but many of them, or many datasets, are not: a full disk would fail
    /// every run's checkpoints and artifacts.
    pub min_free: u64,
}

/// The bytes free to an unprivileged writer on the file system holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st` points to writable
    // memory of the size statvfs fills; it is read only after statvfs reported success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised the whole struct.
    let st = unsafe { st.assume_init() };
    // Both are u64 on Linux x86_64 and aarch64, narrower on some other platforms.
    #[allow(clippy::unnecessary_cast)]
    let bytes = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    Ok(bytes)
}

impl DatasetStore {
    /// Opens (creating) the store and removes uploads a previous process left unfinished.
    pub fn open(data_dir: &Path, max_bytes: u64, min_free: u64) -> Result<Self, DatasetError> {
        let root = data_dir.join("datasets");
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        for e in std::fs::read_dir(&root).map_err(io(&root))?.flatten() {
            if e.file_name().to_string_lossy().starts_with(".upload-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(Self {
            root,
            max_bytes,
            min_free,
        })
    }

    /// `msg` with this store's file paths told as dataset names: `<root>/NAME/data.csv:12`
    /// reads `dataset NAME:12` and `<root>/NAME/images/3.png` reads `images/3.png`. Clients
    /// see run failures; the trainer's disk layout is none of their business.
    pub fn redact_paths(&self, msg: &str) -> String {
        let prefix = format!("{}/", self.root.display());
        let mut out = String::with_capacity(msg.len());
        let mut rest = msg;
        while let Some(at) = rest.find(&prefix) {
            out.push_str(&rest[..at]);
            let after = &rest[at + prefix.len()..];
            let name_end = after.find('/').unwrap_or(after.len());
            let (name, tail) = (&after[..name_end], &after[name_end..]);
            let tail = tail.strip_prefix('/').unwrap_or(tail);
            let file_end = tail
                .find(|c: char| c == ':' || c.is_whitespace())
                .unwrap_or(tail.len());
            let file = &tail[..file_end];
            let is_data_file = self.get(name).is_ok_and(|m| m.file == file);
            if is_data_file || file.is_empty() {
                out.push_str(&format!("dataset {name}"));
                rest = &tail[file_end..];
            } else {
                out.push_str(&format!("{file} (dataset {name})"));
                rest = &tail[file_end..];
            }
        }
        out.push_str(rest);
        out
    }

    /// Bytes that may still be written before the disk is down to [`DatasetStore::min_free`].
    fn room(&self) -> Result<u64, DatasetError> {
        if self.min_free == 0 {
            return Ok(u64::MAX);
        }
        let free = free_bytes(&self.root).map_err(io(&self.root))?;
        Ok(free.saturating_sub(self.min_free))
    }

    /// Refuses to store more once the disk is down to [`DatasetStore::min_free`].
    fn check_free(&self) -> Result<(), DatasetError> {
        match self.room()? {
            0 => Err(DatasetError::DiskFull(self.min_free)),
            _ => Ok(()),
        }
    }

    fn dir(&self, name: &str) -> Result<PathBuf, DatasetError> {
        if !is_safe_name(name) {
            return Err(DatasetError::BadName(name.to_string()));
        }
        Ok(self.root.join(name))
    }

    pub fn get(&self, name: &str) -> Result<DatasetMeta, DatasetError> {
        let meta = self.dir(name)?.join(META);
        let raw = std::fs::read(&meta).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DatasetError::NotFound(name.to_string()),
            _ => DatasetError::Io {
                path: meta.clone(),
                source: e,
            },
        })?;
        serde_json::from_slice(&raw).map_err(|e| DatasetError::Invalid {
            name: name.to_string(),
            msg: format!("{}: {e}", meta.display()),
        })
    }

    /// The file a run reads for dataset `name`.
    pub fn data_file(&self, name: &str) -> Result<PathBuf, DatasetError> {
        let meta = self.get(name)?;
        Ok(self.dir(name)?.join(meta.file))
    }

    pub fn list(&self) -> Result<Vec<DatasetMeta>, DatasetError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root)
            .map_err(io(&self.root))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            if is_safe_name(&name) {
                if let Ok(m) = self.get(&name) {
                    out.push(m);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn delete(&self, name: &str) -> Result<(), DatasetError> {
        self.set_aside(name)?.remove()
    }

    /// Takes dataset `name` out of the store at once (a rename); its files go when the
    /// returned [`Trash`] is removed. The registry sets datasets aside under its lock and
    /// removes them after: removing gigabytes of files under the lock stalled every call.
    pub fn set_aside(&self, name: &str) -> Result<Trash, DatasetError> {
        self.get(name)?;
        let dir = self.dir(name)?;
        let trash = self.trash_path(name);
        std::fs::rename(&dir, &trash).map_err(io(&dir))?;
        Ok(Trash(trash))
    }

    /// A fresh name under the store for a set-aside copy of `name`; the `.upload-` prefix
    /// makes the next [`DatasetStore::open`] remove what a stopped process left there.
    fn trash_path(&self, name: &str) -> PathBuf {
        self.root.join(format!(
            ".upload-delete-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ))
    }

    /// Starts an upload of `name`; nothing is visible until it is vetted ([`Upload::vet`]) and
    /// installed, which the trainer's registry does under its lock
    /// (`Registry::install_dataset`).
    pub fn begin(
        &self,
        name: &str,
        format: Format,
        file_name: &str,
        overwrite: bool,
    ) -> Result<Upload, DatasetError> {
        let dir = self.dir(name)?;
        if !overwrite && dir.join(META).exists() {
            return Err(DatasetError::Exists(name.to_string()));
        }
        let tmp = self.root.join(format!(
            ".upload-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let file = match format {
            Format::Docarray => docarray_file_name(file_name),
            Format::CsvBundle => "bundle.zip".to_string(),
        };
        let path = tmp.join(&file);
        let writer = BufWriter::new(std::fs::File::create(&path).map_err(io(&path))?);
        Ok(Upload {
            name: name.to_string(),
            format,
            tmp,
            file,
            writer: Some(writer),
            bytes: 0,
            max_bytes: self.max_bytes,
            overwrite,
            store: self.clone(),
        })
    }
}

/// `data` plus the docarray suffixes of the client's file name (they name protocol and
/// compression), so the stored file reads as the original did.
fn docarray_file_name(client_name: &str) -> String {
    let base = Path::new(client_name)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let suffixes: Vec<&str> = base
        .split('.')
        .skip(1)
        .filter(|p| {
            matches!(
                *p,
                "protobuf" | "protobuf-array" | "lz4" | "gzip" | "zlib" | "bz2" | "lzma"
            )
        })
        .collect();
    if suffixes.is_empty() {
        "data.docarray".into()
    } else {
        format!("data.{}", suffixes.join("."))
    }
}

/// A dataset being received.
pub struct Upload {
    name: String,
    format: Format,
    tmp: PathBuf,
    file: String,
    writer: Option<BufWriter<std::fs::File>>,
    bytes: u64,
    max_bytes: u64,
    overwrite: bool,
    store: DatasetStore,
}

impl Upload {
    pub fn write(&mut self, data: &[u8]) -> Result<(), DatasetError> {
        self.bytes += data.len() as u64;
        if self.bytes > self.max_bytes {
            return Err(DatasetError::TooLarge(self.max_bytes));
        }
        self.store.check_free()?;
        let path = self.tmp.join(&self.file);
        match &mut self.writer {
            Some(w) => w.write_all(data).map_err(io(&path)),
            None => Ok(()),
        }
    }

    /// The bytes received so far.
    pub fn received(&self) -> u64 {
        self.bytes
    }

    /// Reads the upload through and vets it: what would become the dataset `name` (blocking:
    /// call it off the async runtime).
    pub fn vet(mut self) -> Result<Vetted, DatasetError> {
        let path = self.tmp.join(&self.file);
        if let Some(w) = self.writer.take() {
            w.into_inner()
                .map_err(|e| DatasetError::Io {
                    path: path.clone(),
                    source: e.into_error(),
                })?
                .sync_all()
                .map_err(io(&path))?;
        }
        let invalid = |msg: String| DatasetError::Invalid {
            name: self.name.clone(),
            msg: msg.replace(&self.tmp.display().to_string(), &self.name),
        };
        // Every row's shape and every image are vetted now, so a run on this dataset cannot
        // fail on them after hours of training (or with the trainer's paths in its message).
        let vetting = Vetting {
            max_unpacked: self.max_bytes,
            local_files: false,
        };
        let vet = |p: &Path| {
            let pre = ImagePreprocessor::new(Default::default());
            crate::docarray::validate_dataset(p, &pre, vetting).map_err(|e| match e {
                DataError::TooLarge { .. } => invalid(format!("{e} (--max-dataset-bytes)")),
                e => invalid(e.to_string()),
            })
        };
        let (file, items) = match self.format {
            Format::Docarray => (self.file.clone(), vet(&path)?),
            Format::CsvBundle => {
                // Unpacking stops where the disk would go below its floor, too.
                let room = self.store.room()?;
                let unpacked = extract_bundle(&path, &self.tmp, self.max_bytes.min(room)).map_err(
                    |e| match e {
                        UnzipError::TooLarge(_) if room < self.max_bytes => {
                            DatasetError::DiskFull(self.store.min_free)
                        }
                        UnzipError::TooLarge(_) => {
                            invalid(format!("bundle: {e} (--max-dataset-bytes)"))
                        }
                        UnzipError::Bad(_) => invalid(format!("bundle: {e}")),
                    },
                )?;
                std::fs::remove_file(&path).map_err(io(&path))?;
                self.store.check_free()?;
                // What the dataset holds on disk (`data list`), not what was sent.
                self.bytes = unpacked;
                // extract_bundle made sure it is there.
                let csv = self.tmp.join(BUNDLE_CSV);
                check_csv(&csv).map_err(invalid)?;
                (BUNDLE_CSV.to_string(), vet(&csv)?)
            }
        };
        let meta = DatasetMeta {
            name: self.name.clone(),
            format: self.format,
            file,
            bytes: self.bytes,
            items,
            created_unix: crate::artifact::unix_now(),
        };
        let meta_path = self.tmp.join(META);
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| invalid(e.to_string()))?;
        std::fs::write(&meta_path, json).map_err(io(&meta_path))?;
        Ok(Vetted { upload: self, meta })
    }
}

/// A vetted upload, not yet the dataset its name says (dropped, it leaves nothing behind).
pub struct Vetted {
    upload: Upload,
    meta: DatasetMeta,
}

impl Vetted {
    pub fn name(&self) -> &str {
        &self.upload.name
    }

    /// Makes it the dataset `name`, replacing the one there when the push said so; the
    /// replaced copy is returned to be removed (outside the registry's lock). The new copy is
    /// moved in right after the old one is moved out, so no long removal lies between them
    /// for a crash to fall into.
    pub fn install(self) -> Result<(DatasetMeta, Option<Trash>), DatasetError> {
        let up = &self.upload;
        let dest = up.store.dir(&up.name)?;
        let mut replaced = None;
        if dest.exists() {
            if !up.overwrite {
                return Err(DatasetError::Exists(up.name.clone()));
            }
            let old = up.store.trash_path(&up.name);
            std::fs::rename(&dest, &old).map_err(io(&dest))?;
            replaced = Some(Trash(old));
        }
        if let Err(e) = std::fs::rename(&up.tmp, &dest) {
            // The old copy goes back: set aside, the next start would have removed it.
            if let Some(Trash(old)) = replaced {
                let _ = std::fs::rename(&old, &dest);
            }
            return Err(io(&dest)(e));
        }
        Ok((self.meta, replaced))
    }
}

/// A dataset's files taken out of the store, to be removed.
#[must_use = "a set-aside dataset stays on disk until removed (or the next start)"]
pub struct Trash(PathBuf);

impl Trash {
    pub fn remove(self) -> Result<(), DatasetError> {
        std::fs::remove_dir_all(&self.0).map_err(io(&self.0))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // An upload that did not finish (client gone, refused) leaves nothing behind.
        if self.tmp.exists() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Unpacks a CSV bundle into `dest`: `data.csv`, then only the entries its cells name, each no
/// bigger than an image within the default pixel limit can be, all of them within `max_bytes`;
/// returns the bytes written. Unpacking every entry let a 4 MB upload of zeros write 4 GiB
/// that no row would ever read.
fn extract_bundle(zip_path: &Path, dest: &Path, max_bytes: u64) -> Result<u64, UnzipError> {
    use crate::artifact::extract_zip_entries;
    use crate::model::preprocess::image::{max_file_bytes, DEFAULT_MAX_PIXELS};
    let csv = Path::new(BUNDLE_CSV);
    let first = extract_zip_entries(zip_path, dest, max_bytes, |p| {
        (p == csv).then_some(max_bytes)
    })?;
    if !dest.join(csv).is_file() {
        return Err(UnzipError::Bad(format!("the bundle has no {BUNDLE_CSV}")));
    }
    let bad = |e: DataError| UnzipError::Bad(e.to_string());
    let rows = CsvRows::open(&dest.join(csv)).map_err(bad)?;
    let mut named = std::collections::HashSet::new();
    for row in rows.rows() {
        let (_, fields) = row.map_err(bad)?;
        named.extend(fields.into_iter().map(|f| {
            let f = f.trim();
            PathBuf::from(f.strip_prefix("./").unwrap_or(f))
        }));
    }
    let image_cap = max_file_bytes(DEFAULT_MAX_PIXELS);
    let rest = extract_zip_entries(zip_path, dest, max_bytes - first, |p| {
        (p != csv && named.contains(p)).then_some(image_cap)
    })?;
    Ok(first + rest)
}

/// Every local image of a bundled CSV is inside the bundle (not a path elsewhere on the
/// trainer's disk).
fn check_csv(csv: &Path) -> Result<(), String> {
    let rows = CsvRows::open(csv).map_err(|e| e.to_string())?;
    let base = rows.base().to_path_buf();
    // Compared resolved: `images/../../../etc/hostname` starts with the bundle's folder as
    // written, and would have had the trainer read (and train on) any file on its disk.
    let root = base.canonicalize().map_err(|e| e.to_string())?;
    let inside = |p: &Path| {
        p.canonicalize()
            .is_ok_and(|c| c.starts_with(&root) && c.is_file())
    };
    for row in rows.rows() {
        let (loc, fields) = row.map_err(|e| e.to_string())?;
        for f in &fields {
            if looks_like_image(f, &base) {
                if let ImageSource::Path(p) = image_source(f, &base) {
                    if !inside(&p) {
                        return Err(format!("{loc}: image {} is not in the bundle", quoted(f)));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Reads a local image for a bundle: a regular file within what the default pixel limit allows
/// (a FIFO or `/dev/zero` behind a CSV cell would hang or exhaust the client).
fn read_image_file(p: &Path) -> std::io::Result<Vec<u8>> {
    use crate::model::preprocess::image::{max_file_bytes, read_file, DEFAULT_MAX_PIXELS};
    read_file(p, max_file_bytes(DEFAULT_MAX_PIXELS))
}

/// A dataset packed for pushing: the bytes to send, how the trainer must read them, and the
/// file name whose suffixes matter.
pub struct Packed {
    pub format: Format,
    pub file: PathBuf,
    pub file_name: String,
    /// A temporary file made for the push (removed on drop).
    temp: Option<tempfile::TempPath>,
}

impl Packed {
    pub fn is_temporary(&self) -> bool {
        self.temp.is_some()
    }
}

fn is_csv(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

/// A temporary file for a packed dataset (removed when dropped), and its path.
fn temp_file(suffix: &str) -> Result<(tempfile::NamedTempFile, PathBuf), DataError> {
    let tmp = tempfile::Builder::new()
        .suffix(suffix)
        .tempfile()
        .map_err(|e| DataError::Io {
            path: std::env::temp_dir(),
            source: e,
        })?;
    let path = tmp.path().to_path_buf();
    Ok((tmp, path))
}

/// Prepares the local dataset `path` for a push (see the module doc).
pub fn pack(path: &Path) -> Result<Packed, DataError> {
    // Refused here, with the user's own paths, rather than after the upload.
    crate::docarray::validate_dataset(
        path,
        &ImagePreprocessor::new(Default::default()),
        Vetting::LOCAL,
    )?;
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("data")
        .to_string();
    if is_csv(path) {
        return pack_csv(path, file_name);
    }
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let local_uri = |d: &DocumentProto| {
        d.content.is_none()
            && !d.uri.is_empty()
            && matches!(image_source(&d.uri, &base), ImageSource::Path(_))
    };
    let mut needs_blobs = false;
    for doc in DocReader::open(path)? {
        let doc = doc?;
        if local_uri(&doc) || doc.chunks.iter().any(local_uri) {
            needs_blobs = true;
            break;
        }
    }
    if !needs_blobs {
        return Ok(Packed {
            format: Format::Docarray,
            file: path.to_path_buf(),
            file_name,
            temp: None,
        });
    }
    // Rewrite as an uncompressed protobuf stream with local images inlined as blobs.
    let (tmp, tmp_path) = temp_file(".protobuf")?;
    let ioe = |e: std::io::Error| DataError::Io {
        path: tmp_path.clone(),
        source: e,
    };
    let mut count = 0u64;
    {
        let mut w = BufWriter::new(tmp.as_file());
        w.write_all(&[1u8]).map_err(ioe)?;
        w.write_all(&0u64.to_be_bytes()).map_err(ioe)?;
        let inline = |d: &mut DocumentProto, loc: &str| -> Result<(), DataError> {
            if local_uri(d) {
                if let ImageSource::Path(p) = image_source(&d.uri, &base) {
                    let bytes = read_image_file(&p).map_err(|e| DataError::Malformed {
                        location: loc.to_string(),
                        msg: format!("image {}: {e}", p.display()),
                    })?;
                    d.content = Some(crate::docarray::proto::document_proto::Content::Blob(
                        bytes.into(),
                    ));
                }
            }
            Ok(())
        };
        for (i, doc) in DocReader::open(path)?.enumerate() {
            let mut doc = doc?;
            let loc = format!("{} document {i}", path.display());
            inline(&mut doc, &loc)?;
            for c in &mut doc.chunks {
                inline(c, &loc)?;
            }
            let raw = doc.encode_to_vec();
            let len = u32::try_from(raw.len()).map_err(|_| DataError::Malformed {
                location: loc.clone(),
                msg: "document larger than 4 GiB".into(),
            })?;
            w.write_all(&len.to_be_bytes()).map_err(ioe)?;
            w.write_all(&raw).map_err(ioe)?;
            count += 1;
        }
        w.flush().map_err(ioe)?;
    }
    {
        use std::os::unix::fs::FileExt;
        tmp.as_file()
            .write_all_at(&count.to_be_bytes(), 1)
            .map_err(ioe)?;
    }
    Ok(Packed {
        format: Format::Docarray,
        file: tmp_path,
        file_name: "data.protobuf".into(),
        temp: Some(tmp.into_temp_path()),
    })
}

/// `data.csv` with local image cells rewritten to `images/<n>.<ext>`, plus those images, zipped.
/// The name an image keeps in a bundle: the CSV's own cell when it is a plain relative path
/// below the CSV's folder (so the trainer's example results and errors name the image as the
/// user's CSV does), unless that name is taken.
fn bundle_name(
    cell: &str,
    resolved: &Path,
    base: &Path,
    used: &std::collections::HashSet<String>,
) -> Option<String> {
    use std::path::Component;
    let rel = Path::new(cell);
    let plain = rel.components().all(|c| matches!(c, Component::Normal(_)))
        && !cell.contains(['\\', '\0'])
        && cell.len() <= 1024
        && base.join(rel) == resolved;
    (plain && cell != BUNDLE_CSV && !used.contains(cell)).then(|| cell.to_string())
}

/// `images/<n>.<ext>` for an image named by an absolute path, a path outside the CSV's folder,
/// or a name already taken.
fn numbered_name(used: &std::collections::HashSet<String>, ext: &str) -> String {
    (used.len()..)
        .map(|n| format!("images/{n}.{ext}"))
        .find(|name| !used.contains(name))
        .unwrap_or_else(|| format!("images/{}.{ext}", used.len()))
}

fn pack_csv(path: &Path, file_name: String) -> Result<Packed, DataError> {
    let rows = crate::docarray::csv::CsvRows::open(path)?;
    let base = rows.base().to_path_buf();
    let (tmp, tmp_path) = temp_file(".zip")?;
    let zerr = |e: zip::result::ZipError| DataError::Io {
        path: tmp_path.clone(),
        source: std::io::Error::other(e),
    };
    let ioe = |e: std::io::Error| DataError::Io {
        path: tmp_path.clone(),
        source: e,
    };
    let mut zw = zip::ZipWriter::new(tmp.reopen().map_err(ioe)?);
    // Images are already compressed; the CSV is not.
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let deflated = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut csv_out = csv::WriterBuilder::new()
        .flexible(true)
        .from_writer(Vec::new());
    let mut seen: std::collections::HashMap<PathBuf, String> = std::collections::HashMap::new();
    let mut used: std::collections::HashSet<String> = std::collections::HashSet::new();
    for row in rows.rows() {
        let (loc, fields) = row?;
        let mut out = Vec::with_capacity(fields.len());
        for f in fields {
            let local = match looks_like_image(&f, &base) {
                true => match image_source(&f, &base) {
                    ImageSource::Path(p) => Some(p),
                    _ => None,
                },
                false => None,
            };
            let Some(p) = local else {
                out.push(f);
                continue;
            };
            let rel = match seen.get(&p) {
                Some(r) => r.clone(),
                None => {
                    let bytes = read_image_file(&p).map_err(|e| DataError::Malformed {
                        location: loc.clone(),
                        msg: format!("image {}: {e}", p.display()),
                    })?;
                    let ext = p
                        .extension()
                        .and_then(|e| e.to_str())
                        .map(str::to_ascii_lowercase)
                        .filter(|e| e.chars().all(|c| c.is_ascii_alphanumeric()))
                        .unwrap_or_else(|| "img".into());
                    let rel = bundle_name(&f, &p, &base, &used)
                        .unwrap_or_else(|| numbered_name(&used, &ext));
                    used.insert(rel.clone());
                    zw.start_file(rel.as_str(), stored).map_err(zerr)?;
                    zw.write_all(&bytes).map_err(ioe)?;
                    seen.insert(p, rel.clone());
                    rel
                }
            };
            out.push(rel);
        }
        csv_out
            .write_record(&out)
            .map_err(|e| DataError::Malformed {
                location: loc,
                msg: e.to_string(),
            })?;
    }
    let csv_bytes = csv_out.into_inner().map_err(|e| ioe(e.into_error()))?;
    zw.start_file(BUNDLE_CSV, deflated).map_err(zerr)?;
    zw.write_all(&csv_bytes).map_err(ioe)?;
    zw.finish().map_err(zerr)?;
    Ok(Packed {
        format: Format::CsvBundle,
        file: tmp_path,
        file_name,
        temp: Some(tmp.into_temp_path()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docarray_suffixes_survive() {
        assert_eq!(
            docarray_file_name("x/train.protobuf.lz4"),
            "data.protobuf.lz4"
        );
        assert_eq!(
            docarray_file_name("a.b.protobuf-array"),
            "data.protobuf-array"
        );
        assert_eq!(docarray_file_name("train.bin"), "data.docarray");
        assert_eq!(docarray_file_name("../../etc/passwd"), "data.docarray");
    }

    /// A CSV's relative image paths keep their names in the bundle; an absolute path, one
    /// outside the CSV's folder, or a name already taken is numbered instead.
    #[test]
    fn bundled_images_keep_the_csvs_relative_names() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let png = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/reference/images/tiny_30x20.png"),
        )
        .expect("fixture");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(data.join("images")).expect("images dir");
        for f in ["images/red.png", "images/1.png", "blue.png"] {
            std::fs::write(data.join(f), &png).expect("image");
        }
        std::fs::write(tmp.path().join("outside.png"), &png).expect("image");
        let absolute = data.join("blue.png");
        std::fs::write(
            data.join("pairs.csv"),
            format!(
                "a red dress,images/red.png\na blue dress,{}\nstill blue,blue.png\n\
                 outside,../outside.png\nnumbered,images/1.png\n",
                absolute.display()
            ),
        )
        .expect("csv");
        let packed = pack(&data.join("pairs.csv")).expect("pack");
        let mut zip =
            zip::ZipArchive::new(std::fs::File::open(&packed.file).expect("zip")).expect("zip");
        let mut csv = String::new();
        std::io::Read::read_to_string(&mut zip.by_name(BUNDLE_CSV).expect("data.csv"), &mut csv)
            .expect("read");
        let images: Vec<&str> = csv
            .lines()
            .map(|l| l.rsplit(',').next().unwrap_or_default())
            .collect();
        // The absolute path was numbered first and took images/1.png, so the CSV's own
        // images/1.png is numbered too.
        assert_eq!(
            images,
            [
                "images/red.png",
                "images/1.png",
                "images/1.png",
                "images/2.png",
                "images/3.png"
            ],
            "{csv}"
        );
        for name in [
            "images/red.png",
            "images/1.png",
            "images/2.png",
            "images/3.png",
        ] {
            assert!(zip.by_name(name).is_ok(), "{name} missing");
        }
    }
}
