//! `clipft._native`: the Rust core as the Python package sees it. Everything Finetuner-shaped
//! (argument names, defaults, `Run`, callbacks, exceptions) lives in the Python layer
//! (`python/clipft/`); this module offers the two things it needs and nothing else:
//!
//! - [`session::Session`]: a connection to a trainer (`clipft::trainer::client`). A remote one is
//!   `clipft trainer` elsewhere; a local one is the same trainer service started inside this
//!   process on a loopback port with a random token, over a run registry in the user's data
//!   folder, so local and remote runs are one code path and `get_run` finds local runs again
//!   after Python restarts.
//! - [`model::Model`]: a loaded [`clipft::model::Encoder`] for one tower, encoding texts and
//!   images (blob, tensor, URI) in batches with the GIL released.
//!
//! Blocking work releases the GIL and waits in short slices, checking for Ctrl-C between them
//! ([`wait`]), so a notebook cell can always be interrupted.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::exceptions::{PyConnectionError, PyException, PyValueError};
use pyo3::prelude::*;

mod model;
mod session;

pyo3::create_exception!(
    clipft._native,
    ClipftError,
    PyException,
    "An error from clipft's core (a model that does not load, a file that cannot be read)."
);
pyo3::create_exception!(
    clipft._native,
    TrainerError,
    ClipftError,
    "The trainer refused a call; the message is the trainer's."
);
pyo3::create_exception!(
    clipft._native,
    AuthenticationError,
    TrainerError,
    "The trainer wants a different token (`login(token=...)` / CLIPFT_AUTH_TOKEN)."
);
pyo3::create_exception!(
    clipft._native,
    NotFoundError,
    TrainerError,
    "No run or dataset of that name."
);
pyo3::create_exception!(
    clipft._native,
    AlreadyExistsError,
    TrainerError,
    "A run or dataset of that name exists already."
);

/// The runtime every trainer call and the local trainer service run on.
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("clipft-io")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| ClipftError::new_err(format!("cannot start the I/O runtime: {e}")))
}

/// Runs `fut` to completion with the GIL released, looking for Ctrl-C (and other signals
/// Python handles) every 100 ms; an interrupt drops the future, which cancels the call.
pub(crate) fn wait<T: Send>(py: Python<'_>, fut: impl Future<Output = T> + Send) -> PyResult<T> {
    let rt = runtime()?;
    let mut fut = Box::pin(fut);
    loop {
        let slice = py.detach(|| {
            rt.block_on(async { tokio::time::timeout(Duration::from_millis(100), &mut fut).await })
        });
        match slice {
            Ok(v) => return Ok(v),
            Err(_) => py.check_signals()?,
        }
    }
}

/// A trainer client error as the Python exception that says what happened.
pub(crate) fn client_error(e: clipft::trainer::client::ClientError) -> PyErr {
    use clipft::trainer::client::ClientError;
    match e {
        ClientError::Status(s) => status_error(&s),
        ClientError::Connect { .. } => PyConnectionError::new_err(e.to_string()),
        ClientError::Data(d) => PyValueError::new_err(d.to_string()),
        ClientError::Local { .. } => ClipftError::new_err(e.to_string()),
    }
}

/// A gRPC status from the trainer, by code.
pub(crate) fn status_error(s: &tonic::Status) -> PyErr {
    let msg = s.message().to_string();
    match s.code() {
        tonic::Code::Unauthenticated => AuthenticationError::new_err(msg),
        tonic::Code::NotFound => NotFoundError::new_err(msg),
        tonic::Code::AlreadyExists => AlreadyExistsError::new_err(msg),
        tonic::Code::InvalidArgument => PyValueError::new_err(msg),
        tonic::Code::Unavailable => PyConnectionError::new_err(msg),
        _ => TrainerError::new_err(format!("{msg} ({:?})", s.code())),
    }
}

/// Logs of the core (model loading, the local trainer's runs) to stderr, filtered by
/// `CLIPFT_LOG` (default `warn`), as the command line does.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLIPFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The version of the Rust core compiled in.
#[pyfunction]
fn core_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The backbones clipft knows by name, as Finetuner's `describe_models` rows.
#[pyfunction]
fn backbones(py: Python<'_>) -> PyResult<Vec<Bound<'_, pyo3::types::PyDict>>> {
    use pyo3::types::PyDictMethods;
    clipft::model::backbones::BACKBONES
        .iter()
        .map(|b| {
            let d = pyo3::types::PyDict::new(py);
            d.set_item("name", b.name)?;
            d.set_item("display_name", b.display_name)?;
            d.set_item("task", b.task)?;
            d.set_item("output_dim", b.output_dim)?;
            d.set_item("architecture", b.architecture)?;
            d.set_item("description", b.description)?;
            Ok(d)
        })
        .collect()
}

/// The nine retrieval metrics' names, in Finetuner's order.
#[pyfunction]
fn metric_names() -> Vec<&'static str> {
    clipft::eval::Metrics::NAMES.to_vec()
}

/// Why clipft cannot train the backbone `name`, or None.
#[pyfunction]
fn unsupported_backbone(name: &str) -> Option<String> {
    clipft::model::backbones::unsupported(name)
}

/// A readable random run name (`brisk-heron-4821`), as the trainer gives.
#[pyfunction]
fn random_run_name() -> String {
    clipft::trainer::runs::random_run_name()
}

/// Why this build cannot use the device `spec` (`cpu`, `auto`, `cuda`, `cuda:N`), or None.
#[pyfunction]
fn device_problem(py: Python<'_>, spec: &str) -> Option<String> {
    let spec = spec.to_string();
    py.detach(move || clipft::model::device::parse_device(&spec).err())
        .map(|e| e.to_string())
}

/// Whether `name` may name a run or dataset.
#[pyfunction]
fn is_safe_name(name: &str) -> bool {
    clipft::artifact::is_safe_name(name)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    let py = m.py();
    m.add("ClipftError", py.get_type::<ClipftError>())?;
    m.add("TrainerError", py.get_type::<TrainerError>())?;
    m.add("AuthenticationError", py.get_type::<AuthenticationError>())?;
    m.add("NotFoundError", py.get_type::<NotFoundError>())?;
    m.add("AlreadyExistsError", py.get_type::<AlreadyExistsError>())?;
    m.add_class::<session::Session>()?;
    m.add_class::<session::LogFollower>()?;
    m.add_class::<model::Model>()?;
    m.add_function(wrap_pyfunction!(core_version, m)?)?;
    m.add_function(wrap_pyfunction!(backbones, m)?)?;
    m.add_function(wrap_pyfunction!(metric_names, m)?)?;
    m.add_function(wrap_pyfunction!(unsupported_backbone, m)?)?;
    m.add_function(wrap_pyfunction!(random_run_name, m)?)?;
    m.add_function(wrap_pyfunction!(is_safe_name, m)?)?;
    m.add_function(wrap_pyfunction!(device_problem, m)?)?;
    Ok(())
}
