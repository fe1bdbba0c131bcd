//! Where a model's files come from and how its weights are read.
//!
//! A `--model` is a local folder in Hugging Face layout or a hub repo id. Repo ids resolve through
//! hf-hub's standard cache first, so a cached copy works offline (`HF_HUB_OFFLINE=1` forbids any
//! download); a missing model is an error that names the repo. Weights are safetensors (single
//! file or sharded with an index) or, as a fallback, a PyTorch pickle. Only the tensors of the
//! requested towers are read, each with one positioned read straight into its own buffer (no
//! memory map, so peak memory is the weights once, not weights plus mapped file pages); shards
//! holding none of them are not even opened.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::{ClipConfig, Towers};
use super::ModelError;

/// The files of one model on local disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user named (folder or repo id), for messages and metadata.
    pub source: String,
    pub config: PathBuf,
    pub weights: WeightFiles,
    pub tokenizer: Option<PathBuf>,
    pub preprocessor: Option<PathBuf>,
    /// The folder a zipped artifact was unpacked into, removed when the last holder (these
    /// files, or an [`super::Encoder`] loaded from them) is dropped.
    pub unpacked: Option<std::sync::Arc<tempfile::TempDir>>,
}

/// The checkpoint format found.
#[derive(Debug, Clone)]
pub enum WeightFiles {
    /// One or more safetensors files, with the tensor -> file map when sharded.
    Safetensors {
        files: Vec<PathBuf>,
        index: Option<BTreeMap<String, PathBuf>>,
    },
    /// `pytorch_model.bin`.
    Pickle(PathBuf),
    /// Finetuner's per-tower `model.pt` state dicts (`_model.*`, `_projection.weight`), each with
    /// the tower it holds.
    FinetunerPt(Vec<(PathBuf, Towers)>),
}

const SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const PICKLE: &str = "pytorch_model.bin";

/// Tensor name prefixes a tower owns.
fn tower_prefixes(towers: Towers) -> Vec<&'static str> {
    let mut p = vec!["logit_scale"];
    if towers.text {
        p.extend(["text_model.", "text_projection."]);
    }
    if towers.vision {
        p.extend(["vision_model.", "visual_projection."]);
    }
    p
}

impl ModelFiles {
    /// Resolves `--model`: an existing folder, or else a hub repo id.
    /// Finetuner's display names (`clip-base-en`) name their Hugging Face repo, unless a folder
    /// of that name exists; open-clip names are refused with what to use instead.
    pub fn resolve(spec: &str) -> Result<Self, ModelError> {
        let path = Path::new(spec);
        if !path.exists() {
            if let Some(msg) = super::backbones::unsupported(spec) {
                return Err(ModelError::NotFound {
                    what: spec.into(),
                    msg,
                });
            }
        }
        let spec = match path.exists() {
            true => spec,
            false => super::backbones::canonical(spec),
        };
        let path = Path::new(spec);
        if path.is_dir() {
            Self::from_dir(path)
        } else if path.exists() {
            Err(ModelError::NotFound {
                what: spec.into(),
                msg: "is a file; --model takes a folder in Hugging Face layout or a hub repo id"
                    .into(),
            })
        } else {
            Self::from_hub(spec)
        }
    }

    /// A local folder in Hugging Face layout.
    /// Whether `dir` holds weights [`Self::from_dir`] reads.
    pub fn has_weights(dir: &Path) -> bool {
        [SAFETENSORS, SAFETENSORS_INDEX, PICKLE]
            .iter()
            .any(|w| dir.join(w).is_file())
    }

    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(ModelError::NotFound {
                what: dir.display().to_string(),
                msg: "has no config.json".into(),
            });
        }
        let weights = if dir.join(SAFETENSORS).is_file() {
            WeightFiles::Safetensors {
                files: vec![dir.join(SAFETENSORS)],
                index: None,
            }
        } else if dir.join(SAFETENSORS_INDEX).is_file() {
            read_index(&dir.join(SAFETENSORS_INDEX), |name| Ok(dir.join(name)))?
        } else if dir.join(PICKLE).is_file() {
            WeightFiles::Pickle(dir.join(PICKLE))
        } else {
            return Err(ModelError::NotFound {
                what: dir.display().to_string(),
                msg: format!("has no {SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE}"),
            });
        };
        let opt = |n: &str| Some(dir.join(n)).filter(|p| p.is_file());
        Ok(Self {
            source: dir.display().to_string(),
            config,
            weights,
            tokenizer: opt("tokenizer.json"),
            preprocessor: opt("preprocessor_config.json"),
            unpacked: None,
        })
    }

    /// A hub repo id, from the cache when present, downloaded otherwise (unless offline).
    pub fn from_hub(repo_id: &str) -> Result<Self, ModelError> {
        let hub = Hub::new(repo_id)?;
        let config = hub
            .get("config.json")?
            .ok_or_else(|| hub.missing("config.json"))?;
        // Before any weights are fetched: a repo id is what a client of the trainer sends, and
        // any hub repo's weights (hundreds of GB for some) were downloaded before the config
        // said it was no CLIP.
        ClipConfig::from_file(&config)?;
        let weights = if let Some(p) = hub.get(SAFETENSORS)? {
            WeightFiles::Safetensors {
                files: vec![p],
                index: None,
            }
        } else if let Some(idx) = hub.get(SAFETENSORS_INDEX)? {
            read_index(&idx, |name| hub.get(name)?.ok_or_else(|| hub.missing(name)))?
        } else if let Some(p) = hub.get(PICKLE)? {
            WeightFiles::Pickle(p)
        } else {
            return Err(hub.missing(SAFETENSORS));
        };
        Ok(Self {
            source: repo_id.to_string(),
            config,
            weights,
            tokenizer: hub.get("tokenizer.json")?,
            preprocessor: hub.get("preprocessor_config.json")?,
            unpacked: None,
        })
    }

    /// A VarBuilder over the weights, restricted to the files that hold `towers`' tensors.
    pub fn var_builder(
        &self,
        towers: Towers,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, ModelError> {
        match &self.weights {
            WeightFiles::Safetensors { files, index } => {
                let files: Vec<PathBuf> = match index {
                    None => files.clone(),
                    Some(map) => {
                        let prefixes = tower_prefixes(towers);
                        let mut needed: Vec<PathBuf> = map
                            .iter()
                            .filter(|(name, _)| prefixes.iter().any(|p| name.starts_with(p)))
                            .map(|(_, f)| f.clone())
                            .collect();
                        needed.sort();
                        needed.dedup();
                        needed
                    }
                };
                let reader = SafetensorsReader::open(&files)?;
                Ok(VarBuilder::from_backend(
                    Box::new(reader),
                    dtype,
                    device.clone(),
                ))
            }
            WeightFiles::Pickle(p) => Ok(VarBuilder::from_backend(
                Box::new(PickleReader(PthFile::open(p)?)),
                dtype,
                device.clone(),
            )),
            WeightFiles::FinetunerPt(parts) => {
                let mut files = Vec::new();
                for (path, t) in parts {
                    if (t.text && towers.text) || (t.vision && towers.vision) {
                        files.push((PthFile::open(path)?, *t));
                    }
                }
                Ok(VarBuilder::from_backend(
                    Box::new(FinetunerReader { files }),
                    dtype,
                    device.clone(),
                ))
            }
        }
    }
}

fn read_index(
    path: &Path,
    mut locate: impl FnMut(&str) -> Result<PathBuf, ModelError>,
) -> Result<WeightFiles, ModelError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let idx: Index = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.into(),
        msg: e.to_string(),
    })?;
    let mut located: HashMap<String, PathBuf> = HashMap::new();
    let mut map = BTreeMap::new();
    for (tensor, file) in idx.weight_map {
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(ModelError::Config {
                path: path.into(),
                msg: format!("shard name {file:?} must be a plain file name"),
            });
        }
        let p = match located.get(&file) {
            Some(p) => p.clone(),
            None => {
                let p = locate(&file)?;
                located.insert(file.clone(), p.clone());
                p
            }
        };
        map.insert(tensor, p);
    }
    let mut files: Vec<PathBuf> = located.into_values().collect();
    files.sort();
    Ok(WeightFiles::Safetensors {
        files,
        index: Some(map),
    })
}

/// hf-hub access for one repo, cache first.
struct Hub {
    repo_id: String,
    cache: hf_hub::CacheRepo,
    offline: bool,
    api: Option<hf_hub::api::sync::ApiRepo>,
}

impl Hub {
    fn new(repo_id: &str) -> Result<Self, ModelError> {
        if repo_id.is_empty() || repo_id.split('/').count() > 2 || repo_id.contains("..") {
            return Err(ModelError::NotFound {
                what: repo_id.into(),
                msg: "is neither a local folder nor a hub repo id (owner/name)".into(),
            });
        }
        let offline = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].iter().any(|v| {
            std::env::var(v)
                .map(|s| matches!(s.as_str(), "1" | "true" | "TRUE" | "yes"))
                .unwrap_or(false)
        });
        let cache = hf_hub::Cache::from_env().model(repo_id.to_string());
        let api = if offline {
            None
        } else {
            hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(false)
                .build()
                .ok()
                .map(|a| a.model(repo_id.to_string()))
        };
        Ok(Self {
            repo_id: repo_id.to_string(),
            cache,
            offline,
            api,
        })
    }

    /// `Ok(None)` when the repo does not have the file.
    fn get(&self, file: &str) -> Result<Option<PathBuf>, ModelError> {
        if let Some(p) = self.cache.get(file) {
            return Ok(Some(p));
        }
        let Some(api) = &self.api else {
            return Ok(None);
        };
        match api.get(file) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e)) if is_not_found(&e) => Ok(None),
            Err(e) => Err(ModelError::Hub {
                repo: self.repo_id.clone(),
                msg: format!("cannot fetch {file}: {e} (a cached copy works offline)"),
            }),
        }
    }

    fn missing(&self, file: &str) -> ModelError {
        let how = if self.offline {
            "offline (HF_HUB_OFFLINE) and not in the local Hugging Face cache"
        } else {
            "not found in the cache or on the hub"
        };
        ModelError::Hub {
            repo: self.repo_id.clone(),
            msg: format!("{file} is {how}"),
        }
    }
}

fn is_not_found(e: &impl std::fmt::Display) -> bool {
    let s = e.to_string();
    s.contains("404") || s.contains("Not Found")
}

/// The shape check the safetensors reader owes `VarBuilder::get` (the PyTorch readers check
/// before reading: [`PthFile::read`]).
fn expect_shape(t: Tensor, want: &candle_core::Shape, name: &str) -> candle_core::Result<Tensor> {
    if t.shape() != want {
        candle_core::bail!(
            "shape mismatch for {name}: expected {want:?}, found {:?}",
            t.shape()
        );
    }
    Ok(t)
}

/// Reads individual tensors from safetensors files on demand, for `VarBuilder`.
struct SafetensorsReader {
    files: Vec<std::fs::File>,
    paths: Vec<PathBuf>,
    /// name -> (file index, dtype, shape, absolute byte range)
    tensors: HashMap<String, (usize, DType, Vec<usize>, std::ops::Range<u64>)>,
}

/// Where one tensor's bytes lie in a safetensors file, for reading rows of it on demand.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorLocation {
    pub path: PathBuf,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub range: std::ops::Range<u64>,
}

impl ModelFiles {
    /// Where tensor `name` is stored, when the weights are safetensors files (the header only is
    /// read); `None` for other formats or when it is absent.
    pub fn tensor_location(&self, name: &str) -> Option<TensorLocation> {
        let WeightFiles::Safetensors { files, index } = &self.weights else {
            return None;
        };
        let files: Vec<PathBuf> = match index {
            Some(map) => vec![map.get(name)?.clone()],
            None => files.clone(),
        };
        let reader = SafetensorsReader::open(&files).ok()?;
        let (file, dtype, shape, range) = reader.tensors.get(name)?.clone();
        Some(TensorLocation {
            path: reader.paths[file].clone(),
            dtype,
            shape,
            range,
        })
    }
}

/// Headers larger than this are refused (the format's own reference implementation uses 100 MB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

impl SafetensorsReader {
    fn open(paths: &[PathBuf]) -> Result<Self, ModelError> {
        use std::io::Read;
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let bad = |msg: String| ModelError::Weights {
                files: path.display().to_string(),
                msg,
            };
            let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
            let file_len = f.metadata().map_err(|e| ModelError::io(path, e))?.len();
            let mut len = [0u8; 8];
            f.read_exact(&mut len)
                .map_err(|e| ModelError::io(path, e))?;
            let header_len = u64::from_le_bytes(len);
            if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
                return Err(bad(format!(
                    "not a safetensors file (header of {header_len} bytes)"
                )));
            }
            let mut header = vec![0u8; header_len as usize];
            f.read_exact(&mut header)
                .map_err(|e| ModelError::io(path, e))?;
            let header: HashMap<String, serde_json::Value> =
                serde_json::from_slice(&header).map_err(|e| bad(format!("bad header: {e}")))?;
            let data_start = 8 + header_len;
            for (name, info) in header {
                if name == "__metadata__" {
                    continue;
                }
                #[derive(serde::Deserialize)]
                struct Info {
                    dtype: String,
                    shape: Vec<usize>,
                    data_offsets: (u64, u64),
                }
                let info: Info = serde_json::from_value(info)
                    .map_err(|e| bad(format!("bad header entry {name}: {e}")))?;
                let dtype = match info.dtype.as_str() {
                    "F32" => DType::F32,
                    "F16" => DType::F16,
                    "BF16" => DType::BF16,
                    "F64" => DType::F64,
                    "I64" => DType::I64,
                    "U32" => DType::U32,
                    "U8" => DType::U8,
                    // Tensors of other types (none in CLIP) are left out rather than failing the
                    // whole file; asking for one is then a clear "not found".
                    _ => continue,
                };
                let (a, b) = info.data_offsets;
                let bytes =
                    info.shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
                if a > b || b - a != bytes || data_start + b > file_len {
                    return Err(bad(format!("tensor {name} has inconsistent offsets")));
                }
                tensors.insert(name, (i, dtype, info.shape, data_start + a..data_start + b));
            }
            files.push(f);
        }
        Ok(Self {
            files,
            paths: paths.to_vec(),
            tensors,
        })
    }

    fn read(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        use std::os::unix::fs::FileExt;
        let Some((file, stored, shape, range)) = self.tensors.get(name) else {
            candle_core::bail!("cannot find tensor {name}")
        };
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.files[*file]
            .read_exact_at(&mut buf, range.start)
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "{}: reading {name}: {e}",
                    self.paths[*file].display()
                ))
            })?;
        let t = Tensor::from_raw_buffer(&buf, *stored, shape, &Device::Cpu)?;
        drop(buf);
        t.to_dtype(dtype)?.to_device(dev)
    }
}

impl candle_nn::var_builder::SimpleBackend for SafetensorsReader {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        expect_shape(self.read(name, dtype, dev)?, &s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// A PyTorch zip checkpoint, read one tensor at a time. candle allocates a tensor at the shape
/// its pickle claims before reading a byte of it, so a claimed `(2147483647, 32)` aborted the
/// whole process on a failed 128 GiB allocation; the claim is checked here first, against the
/// shape the model asks for and against the bytes of the zip entry that stores it.
struct PthFile {
    pth: candle_core::pickle::PthTensors,
    /// Zip entry (storage) name -> its size. The shape the model asks for bounds an allocation
    /// already; this bounds the tensors read without one, and names a short storage instead of
    /// failing mid-read.
    storage_bytes: HashMap<String, u64>,
}

impl PthFile {
    fn open(path: &Path) -> Result<Self, ModelError> {
        let bad = |msg: String| ModelError::Weights {
            files: path.display().to_string(),
            msg,
        };
        let pth = candle_core::pickle::PthTensors::new(path, None)
            .map_err(|e| ModelError::weights(std::slice::from_ref(&path.to_path_buf()), e))?;
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| bad(format!("not a PyTorch zip checkpoint: {e}")))?;
        let mut storage_bytes = HashMap::new();
        for info in pth.tensor_infos().values() {
            if storage_bytes.contains_key(&info.path) {
                continue;
            }
            // A missing storage fails when its tensor is asked for, naming it.
            if let Ok(entry) = zip.by_name(&info.path) {
                storage_bytes.insert(info.path.clone(), entry.size());
            }
        }
        Ok(Self { pth, storage_bytes })
    }

    fn contains(&self, stored: &str) -> bool {
        self.pth.tensor_infos().contains_key(stored)
    }

    /// Tensor `stored` (`name` to the model), refused before anything is allocated unless it has
    /// the shape `want` (when given) and its storage holds that many bytes.
    fn read(
        &self,
        name: &str,
        stored: &str,
        want: Option<&candle_core::Shape>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(info) = self.pth.tensor_infos().get(stored) else {
            candle_core::bail!("cannot find tensor {name}")
        };
        let shape = info.layout.shape();
        if let Some(want) = want {
            if shape != want {
                candle_core::bail!("shape mismatch for {name}: expected {want:?}, found {shape:?}");
            }
        }
        let needed = shape
            .dims()
            .iter()
            .try_fold(info.dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_add(info.layout.start_offset()));
        let Some(&held) = self.storage_bytes.get(&info.path) else {
            candle_core::bail!("{name}: its storage {} is not in the checkpoint", info.path)
        };
        if needed.is_none_or(|n| n as u64 > held) {
            candle_core::bail!(
                "{name} of shape {shape:?} ({:?} from byte {}) does not fit in its storage {} \
                 of {held} bytes",
                info.dtype,
                info.layout.start_offset(),
                info.path
            );
        }
        match self.pth.get(stored)? {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("cannot find tensor {name} ({stored})"),
        }
    }
}

/// `pytorch_model.bin`: Hugging Face names as stored.
struct PickleReader(PthFile);

impl candle_nn::var_builder::SimpleBackend for PickleReader {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.read(name, name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.read(name, name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// Finetuner's state-dict names mapped to Hugging Face CLIPModel names: a tower's `_model.X` is
/// `text_model.X` / `vision_model.X`, its `_projection.weight` the tower's projection.
struct FinetunerReader {
    files: Vec<(PthFile, Towers)>,
}

impl FinetunerReader {
    fn stored_name(name: &str, t: Towers) -> Option<String> {
        let (model, projection) = if t.text {
            ("text_model.", "text_projection.weight")
        } else {
            ("vision_model.", "visual_projection.weight")
        };
        if let Some(rest) = name.strip_prefix(model) {
            Some(format!("_model.{rest}"))
        } else if name == projection {
            Some("_projection.weight".to_string())
        } else {
            None
        }
    }

    fn find(&self, name: &str) -> Option<(&PthFile, String)> {
        self.files.iter().find_map(|(pth, t)| {
            let stored = Self::stored_name(name, *t)?;
            pth.contains(&stored).then_some((pth, stored))
        })
    }

    fn read(
        &self,
        name: &str,
        want: Option<&candle_core::Shape>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some((pth, stored)) = self.find(name) else {
            candle_core::bail!("cannot find tensor {name}")
        };
        pth.read(name, &stored, want, dtype, dev)
    }
}

impl candle_nn::var_builder::SimpleBackend for FinetunerReader {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.read(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.find(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Encoder, LoadOptions};

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    /// The fixture's text `model.pt` written to `out` as a new zip, each entry passed through
    /// `edit(name, bytes)`.
    fn rewrite_text_pt(out: &Path, edit: impl Fn(&str, Vec<u8>) -> Vec<u8>) {
        use std::io::{Read, Write};
        let src = fixture("tests/fixtures/finetuner-artifact/models/clip-text/model.pt");
        let mut zin = zip::ZipArchive::new(std::fs::File::open(src).unwrap()).unwrap();
        let mut zout = zip::ZipWriter::new(std::fs::File::create(out).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for i in 0..zin.len() {
            let mut e = zin.by_index(i).unwrap();
            let name = e.name().to_string();
            let mut bytes = Vec::new();
            e.read_to_end(&mut bytes).unwrap();
            zout.start_file(name.as_str(), opts).unwrap();
            zout.write_all(&edit(&name, bytes)).unwrap();
        }
        zout.finish().unwrap();
    }

    fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let at = bytes
            .windows(from.len())
            .position(|w| w == from)
            .expect("pattern in the pickle");
        [&bytes[..at], to, &bytes[at + from.len()..]].concat()
    }

    /// The pickle's `(49408, 32)` of the token embedding (BININT2 49408, BININT1 32) claimed as
    /// `(2147483647, 32)` (BININT).
    fn huge_token_embedding(name: &str, bytes: Vec<u8>) -> Vec<u8> {
        match name.ends_with("data.pkl") {
            true => replace(&bytes, b"M\x00\xc1K\x20", b"J\xff\xff\xff\x7fK\x20"),
            false => bytes,
        }
    }

    /// Finetuner's `_model.X` / `_projection.weight` renamed to Hugging Face's `text_model.X` /
    /// `text_projection.weight`, as a `pytorch_model.bin` has them (BINUNICODE: `X`, u32 length).
    fn hf_names(name: &str, bytes: Vec<u8>) -> Vec<u8> {
        if !name.ends_with("data.pkl") {
            return bytes;
        }
        let mut out = Vec::with_capacity(bytes.len() + 1024);
        let mut i = 0;
        while i < bytes.len() {
            let rest = &bytes[i..];
            let renamed = [&b"_model."[..], b"_projection.weight"]
                .into_iter()
                .find(|p| rest.len() > 5 + p.len() && rest[0] == b'X' && rest[5..].starts_with(p));
            match renamed {
                Some(_) => {
                    let len = u32::from_le_bytes(rest[1..5].try_into().unwrap()) as usize;
                    out.push(b'X');
                    out.extend_from_slice(&(len as u32 + 4).to_le_bytes());
                    out.extend_from_slice(b"text");
                    out.extend_from_slice(&rest[5..5 + len]);
                    i += 5 + len;
                }
                None => {
                    out.push(rest[0]);
                    i += 1;
                }
            }
        }
        out
    }

    fn text_files(weights: WeightFiles) -> ModelFiles {
        ModelFiles {
            source: "test".into(),
            config: fixture("tests/fixtures/clip-tiny/config.json"),
            weights,
            tokenizer: Some(fixture("tests/fixtures/clip-tiny/tokenizer.json")),
            preprocessor: None,
            unpacked: None,
        }
    }

    fn load_text(files: &ModelFiles) -> Result<Encoder, ModelError> {
        Encoder::load(
            files,
            &LoadOptions {
                towers: Towers::TEXT,
                ..LoadOptions::default()
            },
        )
    }

    /// A `model.pt` claiming a huge shape is refused with the shape named, before candle
    /// allocates it (it used to abort the process on a failed 128 GiB allocation); one whose
    /// storage is shorter than its shape is refused too. The unedited rewrite loads, so the
    /// edits alone make the difference.
    #[test]
    fn finetuner_pt_claims_are_checked_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let pt = dir.path().join("model.pt");
        let files = text_files(WeightFiles::FinetunerPt(vec![(pt.clone(), Towers::TEXT)]));

        rewrite_text_pt(&pt, |_, b| b);
        let enc = load_text(&files).unwrap();
        assert_eq!(enc.embed_texts(&["a cat"]).unwrap().len(), 1);

        rewrite_text_pt(&pt, huge_token_embedding);
        let e = load_text(&files).unwrap_err().to_string();
        assert!(
            e.contains("token_embedding") && e.contains("2147483647") && e.contains("49408"),
            "{e}"
        );

        // The right shape over half its bytes.
        rewrite_text_pt(&pt, |name, b| match name.ends_with("data/0") {
            true => b[..b.len() / 2].to_vec(),
            false => b,
        });
        let e = load_text(&files).unwrap_err().to_string();
        assert!(
            e.contains("token_embedding") && e.contains("does not fit in its storage"),
            "{e}"
        );
    }

    /// `pytorch_model.bin` goes through the same checks, for the shape the model asks for and,
    /// when it asks none, for the storage alone.
    #[test]
    fn pytorch_bin_claims_are_checked_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join(PICKLE);
        let files = text_files(WeightFiles::Pickle(bin.clone()));

        rewrite_text_pt(&bin, hf_names);
        load_text(&files).unwrap();

        rewrite_text_pt(&bin, |name, b| {
            hf_names(name, huge_token_embedding(name, b))
        });
        let e = load_text(&files).unwrap_err().to_string();
        assert!(
            e.contains("token_embedding") && e.contains("2147483647") && e.contains("49408"),
            "{e}"
        );
        let vb = files
            .var_builder(Towers::TEXT, DType::F32, &Device::Cpu)
            .unwrap();
        let e = vb
            .get_unchecked("text_model.embeddings.token_embedding.weight")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit in its storage"), "{e}");
    }
}
