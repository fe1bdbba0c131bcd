//! The trainer's client, used by `clipft fit --trainer`, `clipft runs` and `clipft data`: it
//! connects with the bearer token, packs and pushes datasets, follows logs and unpacks artifacts.

use std::path::{Path, PathBuf};

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::datasets::{self, Format};
use crate::protocol::trainer as pb;
use pb::trainer_client::TrainerClient;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("trainer {addr}: {msg}")]
    Connect { addr: String, msg: String },
    /// The trainer's answer; shown as its message alone (the gRPC code is in the value).
    #[error("{}", .0.message())]
    Status(Status),
    #[error(transparent)]
    Data(#[from] crate::docarray::DataError),
    #[error("{path}: {msg}")]
    Local { path: PathBuf, msg: String },
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        Self::Status(s)
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct WithToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for WithToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connected trainer client.
pub type Client = TrainerClient<InterceptedService<Channel, WithToken>>;

/// Connects to the trainer at `addr` (`grpcs://` for TLS, trusting the system's roots and
/// `ca`), sending `token` with every call.
pub async fn connect(
    addr: &str,
    token: Option<&str>,
    ca: Option<&Path>,
) -> Result<Client, ClientError> {
    let err = |msg: String| ClientError::Connect {
        addr: addr.to_string(),
        msg,
    };
    let channel = crate::protocol::transport::connect(addr, ca, std::time::Duration::from_secs(10))
        .await
        .map_err(|e| match e {
            crate::protocol::transport::TransportError::Connect { msg, .. } => {
                err(format!("{msg} (is `clipft trainer` running there?)"))
            }
            crate::protocol::transport::TransportError::Address { msg, .. } => err(msg),
            other => err(other.to_string()),
        })?;
    let token = match token.filter(|t| !t.is_empty()) {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| err("the auth token has characters a header cannot carry".into()))?,
        ),
        None => None,
    };
    Ok(TrainerClient::with_interceptor(channel, WithToken(token))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// Bytes per pushed chunk.
const CHUNK: usize = 1 << 20;

/// Packs the local dataset `path` (see [`datasets::pack`]) and stores it as `name`.
pub async fn push_dataset(
    client: &mut Client,
    name: &str,
    path: &Path,
    overwrite: bool,
) -> Result<pb::Dataset, ClientError> {
    if !path.is_file() {
        return Err(ClientError::Local {
            path: path.to_path_buf(),
            msg: "not a file".into(),
        });
    }
    let p = path.to_path_buf();
    let packed = tokio::task::spawn_blocking(move || datasets::pack(&p))
        .await
        .map_err(|e| ClientError::Local {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })??;
    let size = std::fs::metadata(&packed.file)
        .map_err(|e| ClientError::Local {
            path: packed.file.clone(),
            msg: e.to_string(),
        })?
        .len();
    let header = pb::DatasetHeader {
        name: name.to_string(),
        format: match packed.format {
            Format::Docarray => pb::DatasetFormat::Docarray,
            Format::CsvBundle => pb::DatasetFormat::CsvBundle,
        } as i32,
        file_name: packed.file_name.clone(),
        overwrite,
        size,
    };
    let file = tokio::fs::File::open(&packed.file)
        .await
        .map_err(|e| ClientError::Local {
            path: packed.file.clone(),
            msg: e.to_string(),
        })?;
    let first = futures_util::stream::once(async move {
        pb::PushDatasetRequest {
            part: Some(pb::push_dataset_request::Part::Header(header)),
        }
    });
    let body = futures_util::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; CHUNK];
        match f.read(&mut buf).await {
            // A read error ends the data early; the trainer, told the size, refuses the push.
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((
                    pb::PushDatasetRequest {
                        part: Some(pb::push_dataset_request::Part::Data(buf.into())),
                    },
                    f,
                ))
            }
        }
    });
    use futures_util::StreamExt;
    let reply = client.push_dataset(first.chain(body)).await?;
    drop(packed);
    Ok(reply.into_inner())
}

/// Follows a run's log from the start, calling `on_chunk` for each piece, until the run ends
/// (with `follow`) or the log so far was read, or `on_chunk` says to stop. Reconnects where a
/// stream broke off.
pub async fn stream_logs(
    client: &mut Client,
    name: &str,
    follow: bool,
    on_chunk: &mut (dyn FnMut(&pb::LogChunk) -> std::ops::ControlFlow<()> + Send),
) -> Result<(), ClientError> {
    let mut offset = 0;
    let mut retries = 0;
    loop {
        let req = pb::StreamLogsRequest {
            name: name.to_string(),
            follow,
            offset,
        };
        let mut stream = client.stream_logs(req).await?.into_inner();
        let broke = loop {
            match stream.message().await {
                Ok(Some(c)) => {
                    offset = c.offset;
                    retries = 0;
                    if on_chunk(&c).is_break() {
                        return Ok(());
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        match broke {
            None => return Ok(()),
            Some(e) if retries < 5 && e.code() == tonic::Code::Unavailable => {
                retries += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Some(e) => return Err(e.into()),
        }
    }
}

/// Streams a finished run's artifact zip into `part` (created or truncated).
async fn fetch_zip(
    client: &mut Client,
    name: &str,
    part: &Path,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<(), ClientError> {
    use tokio::io::AsyncWriteExt;
    let local = |e: std::io::Error| ClientError::Local {
        path: part.to_path_buf(),
        msg: e.to_string(),
    };
    let mut file = tokio::fs::File::create(part).await.map_err(local)?;
    let mut stream = client
        .download_artifact(pb::DownloadArtifactRequest {
            name: name.to_string(),
        })
        .await?
        .into_inner();
    let mut got = 0u64;
    while let Some(c) = stream.message().await? {
        file.write_all(&c.data).await.map_err(local)?;
        got += c.data.len() as u64;
        progress(got, c.total_bytes);
    }
    file.flush().await.map_err(local)?;
    file.sync_all().await.map_err(local)
}

/// Downloads a finished run's artifact as the zip `dest` (Finetuner's `save_artifact`), replacing
/// an older copy only once the new one is complete.
pub async fn download_artifact_zip(
    client: &mut Client,
    name: &str,
    dest: &Path,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<PathBuf, ClientError> {
    let local = |path: &Path, e: &dyn std::fmt::Display| ClientError::Local {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| local(&dir, &e))?;
    let file_name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| local(dest, &"not a file name"))?;
    let part = dir.join(format!(".{file_name}.part"));
    let _leftovers = Leftovers(vec![part.clone()]);
    fetch_zip(client, name, &part, progress).await?;
    tokio::fs::rename(&part, dest)
        .await
        .map_err(|e| local(dest, &e))?;
    Ok(dest.to_path_buf())
}

/// Downloads a finished run's artifact and unpacks it as `output/<run name>/`.
pub async fn download_artifact(
    client: &mut Client,
    name: &str,
    output: &Path,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<PathBuf, ClientError> {
    let local = |path: &Path, e: &dyn std::fmt::Display| ClientError::Local {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    tokio::fs::create_dir_all(output)
        .await
        .map_err(|e| local(output, &e))?;
    let dest = output.join(name);
    if dest.exists() {
        return Err(local(
            &dest,
            &"already exists; remove it or choose another --output",
        ));
    }
    let zip_path = output.join(format!(".{name}.zip.part"));
    // Whatever happens (a refused download, a broken stream, a bad zip, Ctrl-C dropping this
    // future), the partial files go.
    let _leftovers = Leftovers(vec![
        zip_path.clone(),
        output.join(format!(".{name}.unpacking")),
    ]);
    fetch_zip(client, name, &zip_path, progress).await?;
    let (zp, out, n) = (zip_path.clone(), output.to_path_buf(), name.to_string());
    let unpacked = tokio::task::spawn_blocking(move || -> Result<PathBuf, String> {
        let tmp = out.join(format!(".{n}.unpacking"));
        let _ = std::fs::remove_dir_all(&tmp);
        crate::artifact::extract_zip(&zp, &tmp, crate::artifact::MAX_UNZIPPED_BYTES)?;
        let inner = tmp.join(&n);
        if !inner.join("models").is_dir() {
            return Err(format!("the artifact zip has no {n}/models folder"));
        }
        let dest = out.join(&n);
        std::fs::rename(&inner, &dest).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(&tmp);
        let _ = std::fs::remove_file(&zp);
        Ok(dest)
    })
    .await
    .map_err(|e| local(&zip_path, &e))?
    .map_err(|e| local(&zip_path, &e))?;
    Ok(unpacked)
}

/// Partial download files, removed when dropped.
struct Leftovers(Vec<PathBuf>);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = match p.is_dir() {
                true => std::fs::remove_dir_all(p),
                false => std::fs::remove_file(p),
            };
        }
    }
}

/// The state word of a run as `clipft runs status` prints it.
pub fn state_word(state: i32) -> &'static str {
    match pb::RunState::try_from(state).unwrap_or(pb::RunState::Unspecified) {
        pb::RunState::Created => "CREATED",
        pb::RunState::Started => "STARTED",
        pb::RunState::Finished => "FINISHED",
        pb::RunState::Failed => "FAILED",
        pb::RunState::Canceled => "CANCELED",
        pb::RunState::Unspecified => "UNKNOWN",
    }
}

/// Runs per ListRuns page when a client wants them all: a page stays far below the message
/// limit whatever the runs hold (their details and configurations are bounded).
pub const RUNS_PAGE: u32 = 500;

/// Every run (of `experiment` unless empty), oldest first, fetched a page at a time.
pub async fn list_runs(client: &mut Client, experiment: &str) -> Result<Vec<pb::Run>, ClientError> {
    list_runs_in_pages(client, experiment, RUNS_PAGE).await
}

/// [`list_runs`] with pages of `page_size` runs.
pub async fn list_runs_in_pages(
    client: &mut Client,
    experiment: &str,
    page_size: u32,
) -> Result<Vec<pb::Run>, ClientError> {
    let page_size = page_size.max(1);
    let mut runs = Vec::new();
    for page in 1.. {
        let r = client
            .list_runs(pb::ListRunsRequest {
                experiment: experiment.to_string(),
                page,
                size: page_size,
            })
            .await?
            .into_inner();
        let last = r.runs.len() < page_size as usize;
        runs.extend(r.runs);
        if last || runs.len() >= r.total as usize {
            break;
        }
    }
    Ok(runs)
}

/// The names of the trainer's datasets.
pub async fn dataset_names(client: &mut Client) -> Result<Vec<String>, ClientError> {
    let list = client.list_datasets(pb::ListDatasetsRequest {}).await?;
    Ok(list
        .into_inner()
        .datasets
        .into_iter()
        .map(|d| d.name)
        .collect())
}

/// A run's example results as the trainer sent them.
pub fn examples_from(m: &pb::RunMetrics) -> crate::eval::ExampleResults {
    let list = |v: &[pb::ExampleResult]| {
        v.iter()
            .map(|x| crate::eval::Example {
                query: x.query.clone(),
                matches: x.matches.clone(),
            })
            .collect()
    };
    crate::eval::ExampleResults {
        before: list(&m.example_before),
        after: list(&m.example_after),
    }
}

/// Metrics from the wire as the table printer takes them.
pub fn metrics_from_map(
    m: &std::collections::HashMap<String, f64>,
) -> Option<crate::eval::Metrics> {
    if m.is_empty() {
        return None;
    }
    let g = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
    Some(crate::eval::Metrics {
        average_precision: g("average_precision"),
        dcg_at_k: g("dcg_at_k"),
        f1_score_at_k: g("f1_score_at_k"),
        hit_at_k: g("hit_at_k"),
        ndcg_at_k: g("ndcg_at_k"),
        precision_at_k: g("precision_at_k"),
        r_precision: g("r_precision"),
        recall_at_k: g("recall_at_k"),
        reciprocal_rank: g("reciprocal_rank"),
    })
}
