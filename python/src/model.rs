//! One tower of a CLIP model, loaded for encoding in this process: the same
//! [`clipft::model::Encoder`] `clipft encode` uses, so the numbers are the command line's.

use std::path::{Path, PathBuf};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use clipft::executor::endpoints::{fetch_uri, ImagePolicy};
use clipft::model::{device, Encoder, LoadOptions, ModelError, ModelFiles, Towers};
use clipft::protocol::docarray::{nd_array_proto, DenseNdArrayProto, NdArrayProto};

use crate::ClipftError;

/// An image as the Python layer hands it over.
enum ImageInput {
    /// Encoded bytes (JPEG, PNG, ...).
    Blob(Vec<u8>),
    /// A path (relative to the current folder), `file://`, `data:` or `http(s)://` URI.
    Uri(String),
    /// A numpy array's bytes: `[H, W]` or `[H, W, C]`, dtype as numpy's `dtype.str`.
    Tensor(Box<NdArrayProto>),
}

fn model_error(e: ModelError) -> PyErr {
    match e {
        ModelError::InvalidInput { .. } | ModelError::Image { .. } => {
            PyValueError::new_err(e.to_string())
        }
        other => ClipftError::new_err(other.to_string()),
    }
}

/// A loaded tower (`clip-text` or `clip-vision`) and where it came from.
#[pyclass(module = "clipft._native", frozen)]
pub struct Model {
    encoder: Encoder,
    towers: Towers,
    #[pyo3(get)]
    source: String,
    #[pyo3(get)]
    device: String,
}

/// Whether `path` is an artifact: a zip, or a folder with `models/`.
fn is_artifact(path: &Path) -> bool {
    path.is_file() || path.join("models").is_dir()
}

#[pymethods]
impl Model {
    /// Loads `select_model` (`clip-text` or `clip-vision`) of an artifact folder or zip (clipft's
    /// or Finetuner's), a Hugging Face folder or a hub repo id, on `device` (`auto`, `cpu`,
    /// `cuda:N`) in `dtype` (`auto`, `f32`, `f16`, `bf16`). `backbone` names the base model of
    /// a Finetuner artifact whose metadata does not.
    #[staticmethod]
    #[pyo3(signature = (spec, select_model, device="auto", dtype="auto", backbone=None))]
    fn load(
        py: Python<'_>,
        spec: &str,
        select_model: &str,
        device: &str,
        dtype: &str,
        backbone: Option<String>,
    ) -> PyResult<Self> {
        let towers = match select_model {
            "clip-text" | "clip-vision" => Towers::from_select(select_model)
                .ok_or_else(|| PyValueError::new_err(format!("unknown model {select_model}")))?,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown model {other:?}: a CLIP model holds clip-text and clip-vision"
                )))
            }
        };
        let spec = spec.to_string();
        let (device_s, dtype_s) = (device.to_string(), dtype.to_string());
        let encoder = py
            .detach(move || -> Result<Encoder, ModelError> {
                let path = PathBuf::from(&spec);
                let files = if is_artifact(&path) {
                    clipft::artifact::submodel_files_with_backbone(
                        &path,
                        towers,
                        backbone.as_deref(),
                    )?
                } else {
                    ModelFiles::resolve(&spec)?
                };
                let dev = device::parse_device(&device_s)?;
                let dtype = device::parse_dtype(&dtype_s, &dev)?;
                let opts = LoadOptions {
                    towers,
                    device: dev,
                    dtype,
                    ..Default::default()
                };
                Encoder::load(&files, &opts)
            })
            .map_err(model_error)?;
        let device = match &encoder.device {
            candle_device if candle_device.is_cpu() => "cpu".to_string(),
            other => format!("{other:?}"),
        };
        Ok(Self {
            source: encoder.source.clone(),
            encoder,
            towers,
            device,
        })
    }

    /// `clip-text` or `clip-vision`.
    #[getter]
    fn select_model(&self) -> &'static str {
        if self.towers.text {
            clipft::artifact::TEXT_SUBMODEL
        } else {
            clipft::artifact::VISION_SUBMODEL
        }
    }

    /// Embedding width.
    #[getter]
    fn output_dim(&self) -> usize {
        self.encoder.output_dim()
    }

    /// Embeddings of `texts` as `(float32 bytes, rows, dim)`, in order.
    fn encode_texts<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
    ) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
        let dim = self.encoder.output_dim();
        let rows = py
            .detach(|| {
                self.encoder
                    .embed_texts_batched(&texts, texts.len().max(1), &mut |_| {})
            })
            .map_err(model_error)?;
        Ok((to_bytes(py, &rows), rows.len(), dim))
    }

    /// Embeddings of images as `(float32 bytes, rows, dim)`, in order. Each item is
    /// `("blob", bytes)`, `("uri", str)` or `("tensor", bytes, shape, dtype)`; images are
    /// decoded and preprocessed in parallel.
    fn encode_images<'py>(
        &self,
        py: Python<'py>,
        images: Vec<Bound<'py, PyTuple>>,
    ) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
        let inputs = images
            .iter()
            .enumerate()
            .map(|(i, t)| {
                image_input(t)
                    .map(|x| (i, x))
                    .map_err(|e| PyValueError::new_err(format!("image {i}: {e}")))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let dim = self.encoder.output_dim();
        let policy = ImagePolicy {
            allow_http: true,
            ..Default::default()
        };
        let rows = py
            .detach(|| {
                self.encoder.embed_images_batched(
                    &inputs,
                    inputs.len().max(1),
                    |(i, x): &(usize, ImageInput), pre| {
                        prepare(x, pre, &policy).map_err(|e| ModelError::Image {
                            msg: format!("image {i}: {e}"),
                        })
                    },
                    &mut |_| {},
                )
            })
            .map_err(model_error)?;
        Ok((to_bytes(py, &rows), rows.len(), dim))
    }

    fn __repr__(&self) -> String {
        format!(
            "Model({}, select_model={}, device={})",
            self.source,
            self.select_model(),
            self.device
        )
    }
}

/// One image's pixels, ready for the tower.
fn prepare(
    x: &ImageInput,
    pre: &clipft::model::ImagePreprocessor,
    policy: &ImagePolicy,
) -> Result<Vec<f32>, String> {
    let bytes = match x {
        ImageInput::Blob(b) => return pre.preprocess_bytes(b).map_err(|e| e.to_string()),
        ImageInput::Tensor(t) => {
            let (data, h, w, c) = clipft::protocol::ndarray::image_pixels(t)?;
            return pre
                .preprocess_hwc_u8(&data, h, w, c)
                .map_err(|e| e.to_string());
        }
        ImageInput::Uri(uri) => {
            let lower = uri.to_ascii_lowercase();
            if uri.starts_with("data:")
                || lower.starts_with("http://")
                || lower.starts_with("https://")
            {
                fetch_uri(uri, policy, pre)?
            } else {
                let path = uri.strip_prefix("file://").unwrap_or(uri);
                pre.read_file(std::path::Path::new(path))
                    .map_err(|e| e.to_string())?
            }
        }
    };
    pre.preprocess_bytes(&bytes).map_err(|e| e.to_string())
}

/// Parses one `("blob" | "uri" | "tensor", ...)` tuple.
fn image_input(t: &Bound<'_, PyTuple>) -> Result<ImageInput, String> {
    let kind: String = t
        .get_item(0)
        .and_then(|k| k.extract())
        .map_err(|_| "expected (kind, ...)".to_string())?;
    let item = |i: usize| t.get_item(i).map_err(|e| e.to_string());
    let input = match kind.as_str() {
        "blob" => ImageInput::Blob(bytes_of(&item(1)?)?),
        "uri" => ImageInput::Uri(item(1)?.extract::<String>().map_err(|e| e.to_string())?),
        "tensor" => {
            let buffer = bytes_of(&item(1)?)?;
            let shape = item(2)?.extract::<Vec<u32>>().map_err(|e| e.to_string())?;
            let dtype = item(3)?.extract::<String>().map_err(|e| e.to_string())?;
            ImageInput::Tensor(Box::new(NdArrayProto {
                content: Some(nd_array_proto::Content::Dense(DenseNdArrayProto {
                    buffer: buffer.into(),
                    shape,
                    dtype,
                })),
                ..Default::default()
            }))
        }
        other => return Err(format!("unknown image kind {other:?}")),
    };
    Ok(input)
}

/// The bytes of a `bytes` object, copied once (not element by element as a sequence).
fn bytes_of(b: &Bound<'_, PyAny>) -> Result<Vec<u8>, String> {
    b.cast::<PyBytes>()
        .map(|b| b.as_bytes().to_vec())
        .map_err(|_| "expected bytes".to_string())
}

/// Rows of f32 as one little-endian byte string (numpy's `frombuffer` reads it without a copy).
fn to_bytes<'py>(py: Python<'py>, rows: &[Vec<f32>]) -> Bound<'py, PyBytes> {
    let n: usize = rows.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(n * 4);
    for r in rows {
        for v in r {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    PyBytes::new(py, &out)
}
