//! A small Rust client for a Jina-protocol executor, as clip_client uses it: documents go out in
//! requests of `request_size` over one `JinaRPC/Call` stream, and embeddings come back by id.
//! The demo uses it to query the executor it starts.

use std::collections::HashMap;

use crate::protocol::docarray::{document_proto::Content, DocumentArrayProto, DocumentProto};
use crate::protocol::jina::{
    data_request_proto::{data_content_proto::Documents, DataContentProto},
    jina_rpc_client::JinaRpcClient,
    DataRequestProto, HeaderProto,
};
use crate::protocol::ndarray;

/// What a client gives to embed.
#[derive(Debug, Clone)]
pub enum Input {
    Text(String),
    /// Encoded image bytes.
    Image(Vec<u8>),
}

/// Embeds `items` (keyed by id) through the executor at `channel` with `/encode`, `request_size`
/// documents per request; returns the embeddings by id. An error status in any reply is an error.
pub async fn encode(
    channel: tonic::transport::Channel,
    items: Vec<(String, Input)>,
    request_size: usize,
) -> anyhow::Result<HashMap<String, Vec<f32>>> {
    let mut requests = Vec::new();
    for (n, chunk) in items.chunks(request_size.max(1)).enumerate() {
        let docs = chunk
            .iter()
            .map(|(id, c)| DocumentProto {
                id: id.clone(),
                content: Some(match c {
                    Input::Text(t) => Content::Text(t.clone()),
                    Input::Image(b) => Content::Blob(b.clone().into()),
                }),
                ..Default::default()
            })
            .collect();
        requests.push(DataRequestProto {
            header: Some(HeaderProto {
                request_id: format!("{n:032x}"),
                exec_endpoint: Some("/encode".into()),
                ..Default::default()
            }),
            parameters: None,
            routes: Vec::new(),
            data: Some(DataContentProto {
                documents: Some(Documents::Docs(DocumentArrayProto { docs })),
            }),
        });
    }
    let mut stream = JinaRpcClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .call(futures_util::stream::iter(requests))
        .await?
        .into_inner();
    let mut out = HashMap::with_capacity(items.len());
    while let Some(reply) = stream.message().await? {
        if let Some(s) = reply.header.as_ref().and_then(|h| h.status.as_ref()) {
            if s.code != 0 {
                anyhow::bail!("the executor answered an error: {}", s.description);
            }
        }
        if let Some(DataContentProto {
            documents: Some(Documents::Docs(da)),
        }) = reply.data
        {
            for d in da.docs {
                let e = d.embedding.as_ref().ok_or_else(|| {
                    anyhow::anyhow!("document {} came back without an embedding", d.id)
                })?;
                let (v, _) = ndarray::to_f32(e).map_err(anyhow::Error::msg)?;
                out.insert(d.id, v);
            }
        }
    }
    Ok(out)
}
