//! The executor over real gRPC on loopback: every Jina service, every endpoint, parameters,
//! document fields, bad input, cancellation and back-pressure. The Python clients' view is in
//! tests/interop.rs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clipft::docarray::{HttpFetch, ImageHosts};
use clipft::executor::{Core, ExecutorOptions, ImagePolicy, ServerConfig};
use clipft::model::{Encoder, LoadOptions, ModelFiles, Towers};
use clipft::protocol::docarray::{
    document_proto::Content, nd_array_proto, DocumentArrayProto, DocumentProto,
};
use clipft::protocol::jina::{
    data_request_proto::{data_content_proto::Documents, DataContentProto},
    jina_data_request_rpc_client::JinaDataRequestRpcClient,
    jina_discover_endpoints_rpc_client::JinaDiscoverEndpointsRpcClient,
    jina_gateway_dry_run_rpc_client::JinaGatewayDryRunRpcClient,
    jina_info_rpc_client::JinaInfoRpcClient,
    jina_rpc_client::JinaRpcClient,
    jina_single_data_request_rpc_client::JinaSingleDataRequestRpcClient,
    jina_single_document_request_rpc_client::JinaSingleDocumentRequestRpcClient,
    DataRequestListProto, DataRequestProto, HeaderProto, RouteProto, SingleDocumentRequestProto,
};
use clipft::protocol::{ndarray, params::to_struct};
use prost_types::{value::Kind, Value};
use tokio::sync::oneshot;
use tonic::transport::Channel;

mod common;

type R<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("reference/images").join(name)).unwrap_or_default()
}

fn encoder(towers: Towers, max_pixels: Option<u64>) -> R<Encoder> {
    let files = ModelFiles::from_dir(&fixtures().join("clip-tiny"))?;
    let mut opts = LoadOptions {
        towers,
        ..Default::default()
    };
    if let Some(p) = max_pixels {
        opts.max_image_pixels = p;
    }
    Ok(Encoder::load(&files, &opts)?)
}

/// A served executor on a free loopback port; dropping it shuts the server down.
struct Served {
    channel: Channel,
    addr: std::net::SocketAddr,
    core: Arc<Core>,
    encoder: Encoder,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Served {
    async fn start(towers: Towers, opts: ExecutorOptions, server: ServerConfig) -> R<Self> {
        Self::start_with(towers, None, opts, server).await
    }

    async fn start_with(
        towers: Towers,
        max_pixels: Option<u64>,
        opts: ExecutorOptions,
        server: ServerConfig,
    ) -> R<Self> {
        // The CLI's default: AMX bf16x3 products where the CPU has AMX, so the executor also
        // releases the f32 weights it has packed (the test's own encoder keeps them).
        clipft::model::cpu::set_matmul_precision(clipft::model::cpu::MatmulPrecision::High);
        let encoder = encoder(towers, max_pixels)?;
        let core = Core::start(encoder.clone(), &opts)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let core = core.clone();
            async move {
                let _ = clipft::executor::serve(core, server, listener, async {
                    let _ = stopped.await;
                })
                .await;
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        Ok(Self {
            channel,
            addr,
            core,
            encoder,
            stop: Some(stop),
            task: Some(task),
        })
    }

    async fn default() -> R<Self> {
        Self::start(
            Towers::ALL,
            ExecutorOptions::default(),
            ServerConfig::default(),
        )
        .await
    }

    fn single(&self) -> JinaSingleDataRequestRpcClient<Channel> {
        JinaSingleDataRequestRpcClient::new(self.channel.clone())
    }

    async fn shutdown(mut self) -> R {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await?;
        }
        Ok(())
    }
}

fn text_doc(id: &str, text: &str) -> DocumentProto {
    DocumentProto {
        id: id.into(),
        content: Some(Content::Text(text.into())),
        ..Default::default()
    }
}

fn blob_doc(id: &str, bytes: Vec<u8>) -> DocumentProto {
    DocumentProto {
        id: id.into(),
        content: Some(Content::Blob(bytes.into())),
        ..Default::default()
    }
}

fn request(
    endpoint: &str,
    docs: Vec<DocumentProto>,
    params: Vec<(&str, Value)>,
) -> DataRequestProto {
    DataRequestProto {
        header: Some(HeaderProto {
            request_id: format!("req-{endpoint}"),
            exec_endpoint: Some(endpoint.into()),
            ..Default::default()
        }),
        parameters: Some(to_struct(params)),
        routes: Vec::new(),
        data: Some(DataContentProto {
            documents: Some(Documents::Docs(DocumentArrayProto { docs })),
        }),
    }
}

fn docs(r: &DataRequestProto) -> &[DocumentProto] {
    match r.data.as_ref().and_then(|d| d.documents.as_ref()) {
        Some(Documents::Docs(da)) => &da.docs,
        _ => &[],
    }
}

fn emb(d: &DocumentProto) -> Option<Vec<f32>> {
    d.embedding
        .as_ref()
        .and_then(|e| ndarray::to_f32(e).ok())
        .map(|(v, _)| v)
}

fn error_of(r: &DataRequestProto) -> Option<(String, String)> {
    let s = r.header.as_ref()?.status.as_ref()?;
    if s.code != 1 {
        return None;
    }
    let e = s.exception.as_ref()?;
    Some((e.name.clone(), e.args.join(" ")))
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs()))
}

fn b(v: bool) -> Value {
    Value {
        kind: Some(Kind::BoolValue(v)),
    }
}
fn s(v: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(v.into())),
    }
}
fn n(v: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(v)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_encodes_every_input_kind_and_keeps_every_field() -> R {
    let served = Served::default().await?;
    let png = image_bytes("rgb_300x200.png");
    let pre = served.encoder.image_preprocessor()?.clone();
    let want_png = served
        .encoder
        .embed_pixels(&[pre.preprocess_bytes(&png)?])?
        .remove(0);
    let want_text = served
        .encoder
        .embed_texts(&["a red striped dress"])?
        .remove(0);
    let hwc: Vec<u8> = (0..40 * 30 * 3).map(|i| (i * 7 % 251) as u8).collect();
    let want_tensor = served
        .encoder
        .embed_pixels(&[pre.preprocess_hwc_u8(&hwc, 40, 30, 3)?])?
        .remove(0);
    let as_f32: Vec<u8> = hwc.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect();
    use base64::Engine;
    let data_uri = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );

    let mut text = text_doc("t1", "a red striped dress");
    text.tags = Some(to_struct([("finetuner_label", s("dress")), ("n", n(3.0))]));
    text.weight = 0.5;
    text.matches = vec![text_doc("m1", "not encoded at @r")];
    let mut blob = blob_doc("b1", png.clone());
    blob.mime_type = "image/png".into();
    blob.uri = "rgb_300x200.png".into();
    let mut t_u8 = DocumentProto {
        id: "u8".into(),
        content: Some(Content::Tensor(ndarray::numpy(
            hwc.clone(),
            vec![40, 30, 3],
            "|u1",
        ))),
        ..Default::default()
    };
    t_u8.chunks = vec![text_doc("chunk", "kept")];
    let t_f32 = DocumentProto {
        id: "f32".into(),
        content: Some(Content::Tensor(ndarray::numpy(
            as_f32,
            vec![40, 30, 3],
            "<f4",
        ))),
        ..Default::default()
    };
    let uri = DocumentProto {
        id: "uri".into(),
        uri: data_uri.clone(),
        ..Default::default()
    };
    let empty = DocumentProto {
        id: "nothing".into(),
        ..Default::default()
    };
    let sent = vec![
        text.clone(),
        blob.clone(),
        t_u8.clone(),
        t_f32,
        uri,
        empty.clone(),
    ];
    let req = request(
        "/encode",
        sent.clone(),
        vec![("drop_image_content", b(true))],
    );

    let mut client = JinaRpcClient::new(served.channel.clone());
    let mut stream = client
        .call(futures_util::stream::iter(vec![req]))
        .await?
        .into_inner();
    let reply = stream.message().await?.ok_or("no reply")?;
    assert!(stream.message().await?.is_none());
    assert!(error_of(&reply).is_none(), "{:?}", reply.header);
    assert_eq!(
        reply.header.as_ref().map(|h| h.request_id.as_str()),
        Some("req-/encode")
    );
    let got = docs(&reply);
    let ids: Vec<&str> = got.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["t1", "b1", "u8", "f32", "uri", "nothing"]);
    assert!(close(&emb(&got[0]).ok_or("text")?, &want_text));
    assert!(close(&emb(&got[1]).ok_or("blob")?, &want_png));
    assert!(close(&emb(&got[2]).ok_or("u8")?, &want_tensor));
    assert!(close(&emb(&got[3]).ok_or("f32")?, &want_tensor));
    assert!(close(&emb(&got[4]).ok_or("uri")?, &want_png));
    assert!(
        emb(&got[5]).is_none(),
        "a document with nothing to embed gets no embedding"
    );
    let e = got[0].embedding.as_ref().ok_or("embedding")?;
    assert_eq!(e.cls_name, "numpy");
    match &e.content {
        Some(nd_array_proto::Content::Dense(d)) => {
            assert_eq!(d.dtype, "<f4");
            assert_eq!(d.shape, vec![served.encoder.output_dim() as u32]);
        }
        other => panic!("embedding {other:?}"),
    }
    // Every other field as sent; image content dropped, uri kept.
    let mut expect_text = text.clone();
    expect_text.embedding = got[0].embedding.clone();
    assert_eq!(got[0], expect_text);
    assert!(emb(&got[0].matches[0]).is_none());
    assert_eq!(got[1].content, None);
    assert_eq!(
        (got[1].uri.as_str(), got[1].mime_type.as_str()),
        ("rgb_300x200.png", "image/png")
    );
    assert_eq!(got[2].content, None);
    assert_eq!(got[2].chunks, t_u8.chunks);
    assert_eq!(got[4].uri, data_uri);
    assert_eq!(got[5], empty);
    // Routes: a direct client sees a gateway route and ours, both timed.
    let routes: Vec<&str> = reply.routes.iter().map(|r| r.executor.as_str()).collect();
    assert_eq!(routes, ["gateway", "clipft"]);
    assert!(reply
        .routes
        .iter()
        .all(|r| r.start_time.is_some() && r.end_time.is_some()));

    // Without drop_image_content the blob stays.
    let reply = served
        .single()
        .process_single_data(request("/", vec![blob], vec![]))
        .await?
        .into_inner();
    assert!(matches!(docs(&reply)[0].content, Some(Content::Blob(_))));
    assert!(emb(&docs(&reply)[0]).is_some());
    served.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_paths_and_per_executor_parameters() -> R {
    let served = Served::default().await?;
    let parent = |id: &str| {
        let mut d = text_doc(id, "root text");
        d.chunks = vec![
            text_doc(&format!("{id}.c0"), "chunk zero"),
            text_doc(&format!("{id}.c1"), "chunk one"),
        ];
        d.matches = vec![text_doc(&format!("{id}.m0"), "match zero")];
        d
    };
    let embedded = |r: &DataRequestProto| -> Vec<String> {
        fn walk(d: &DocumentProto, out: &mut Vec<String>) {
            if d.embedding.is_some() {
                out.push(d.id.clone());
            }
            d.chunks.iter().chain(&d.matches).for_each(|c| walk(c, out));
        }
        let mut out = Vec::new();
        docs(r).iter().for_each(|d| walk(d, &mut out));
        out
    };
    type Case<'a> = (Vec<(&'a str, Value)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (vec![], vec!["a"]),
        (vec![("access_paths", s("@c"))], vec!["a.c0", "a.c1"]),
        (vec![("traversal_paths", s("@r,m"))], vec!["a", "a.m0"]),
        (vec![("access_paths", s("@c[1:]"))], vec!["a.c1"]),
        (vec![("clipft__access_paths", s("@m"))], vec!["a.m0"]),
        (vec![("other__access_paths", s("@m"))], vec!["a"]),
        (
            vec![
                ("access_paths", s("@c")),
                (
                    "clipft",
                    Value {
                        kind: Some(Kind::StructValue(to_struct([("access_paths", s("@r,c"))]))),
                    },
                ),
            ],
            vec!["a", "a.c0", "a.c1"],
        ),
    ];
    for (params, want) in cases {
        let label = format!("{params:?}");
        let reply = served
            .single()
            .process_single_data(request("/encode", vec![parent("a")], params))
            .await?
            .into_inner();
        assert!(
            error_of(&reply).is_none(),
            "{label}: {:?}",
            error_of(&reply)
        );
        assert_eq!(embedded(&reply), want, "{label}");
    }
    // A per-request minibatch size is honoured; a bad one is an in-band error naming it.
    let before = served
        .core
        .text
        .as_ref()
        .ok_or("text")?
        .stats
        .max_batch
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(before >= 1);
    let many: Vec<DocumentProto> = (0..10)
        .map(|i| text_doc(&format!("x{i}"), "some text"))
        .collect();
    let reply = served
        .single()
        .process_single_data(request(
            "/encode",
            many.clone(),
            vec![("minibatch_size", n(3.0))],
        ))
        .await?
        .into_inner();
    assert!(docs(&reply).iter().all(|d| d.embedding.is_some()));
    let reply = served
        .single()
        .process_single_data(request("/encode", many, vec![("minibatch_size", s("big"))]))
        .await?
        .into_inner();
    let (name, msg) = error_of(&reply).ok_or("expected an error")?;
    assert_eq!(name, "BadParameterError");
    assert!(msg.contains("minibatch_size"), "{msg}");
    let reply = served
        .single()
        .process_single_data(request(
            "/encode",
            vec![parent("a")],
            vec![("access_paths", s("@x"))],
        ))
        .await?
        .into_inner();
    assert!(error_of(&reply).ok_or("bad path")?.1.contains("@x"));
    served.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_scores_and_sorts_matches_like_clip_server() -> R {
    let served = Served::default().await?;
    let png = image_bytes("rgb_224x224.png");
    let mut q = text_doc("q", "a red dress");
    q.matches = vec![
        text_doc("far", "completely different words"),
        blob_doc("img", png),
        text_doc("same", "a red dress"),
    ];
    let reply = served
        .single()
        .process_single_data(request("/rank", vec![q], vec![]))
        .await?
        .into_inner();
    assert!(error_of(&reply).is_none(), "{:?}", error_of(&reply));
    let root = &docs(&reply)[0];
    assert!(emb(root).is_some(), "the query keeps its embedding");
    let ids: Vec<&str> = root.matches.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids[0], "same", "identical text ranks first");
    let mut total = 0.0;
    let mut last = f32::INFINITY;
    for m in &root.matches {
        let score = m.scores.get("clip_score").ok_or("clip_score")?;
        let cosine = m
            .scores
            .get("clip_score_cosine")
            .ok_or("clip_score_cosine")?;
        assert_eq!(
            (score.op_name.as_str(), cosine.op_name.as_str()),
            ("softmax", "cosine")
        );
        assert!(score.value <= last);
        last = score.value;
        total += score.value as f64;
        assert!(m.embedding.is_none(), "match embeddings are removed");
    }
    assert!((total - 1.0).abs() < 1e-5);
    let same = root.matches[0].scores["clip_score_cosine"].value;
    assert!((same - 1.0).abs() < 1e-5);
    // Softmax at logit scale exp(4.60517) over the cosines.
    let cos: Vec<f64> = root
        .matches
        .iter()
        .map(|m| m.scores["clip_score_cosine"].value as f64)
        .collect();
    let z: f64 = cos
        .iter()
        .map(|c| (4.60517f64.exp() * (c - cos[0])).exp())
        .sum();
    assert!((root.matches[0].scores["clip_score"].value as f64 - 1.0 / z).abs() < 1e-5);

    // One tower cannot rank.
    let text_only = Served::start(
        Towers::TEXT,
        ExecutorOptions::default(),
        ServerConfig::default(),
    )
    .await?;
    let mut q = text_doc("q", "x");
    q.matches = vec![text_doc("m", "y")];
    let reply = text_only
        .single()
        .process_single_data(request("/rank", vec![q], vec![]))
        .await?
        .into_inner();
    assert_eq!(error_of(&reply).ok_or("rank error")?.0, "MissingTowerError");
    text_only.shutdown().await?;
    served.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tower_executors_pass_the_other_modality_through() -> R {
    let png = image_bytes("rgb_224x224.png");
    let sent = vec![text_doc("t", "hello"), blob_doc("i", png)];
    let text = Served::start(
        Towers::TEXT,
        ExecutorOptions::default(),
        ServerConfig::default(),
    )
    .await?;
    let vision = Served::start(
        Towers::VISION,
        ExecutorOptions::default(),
        ServerConfig::default(),
    )
    .await?;
    // Straight from a client, the image cannot be embedded here: the request fails and says why
    // (clip_client would otherwise only see "Empty embedding returned from the server").
    let direct = text
        .single()
        .process_single_data(request("/encode", sent.clone(), vec![]))
        .await?
        .into_inner();
    let (name, msg) = error_of(&direct).ok_or("a direct image to a text executor must fail")?;
    assert_eq!(name, "BadDocumentError");
    assert!(
        msg.contains("docs[1]") && msg.contains("serves only clip-text"),
        "{msg}"
    );
    // Behind a gateway (which writes its route first), another executor of the Flow may embed
    // it: it passes through.
    let mut via_gateway = request("/encode", sent.clone(), vec![]);
    via_gateway.routes.push(RouteProto {
        executor: "gateway".into(),
        ..Default::default()
    });
    let r1 = text
        .single()
        .process_single_data(via_gateway)
        .await?
        .into_inner();
    assert!(error_of(&r1).is_none());
    assert!(emb(&docs(&r1)[0]).is_some());
    assert_eq!(
        docs(&r1)[1],
        sent[1],
        "the image passes the text executor untouched"
    );
    let r2 = vision.single().process_single_data(r1).await?.into_inner();
    assert!(emb(&docs(&r2)[0]).is_some() && emb(&docs(&r2)[1]).is_some());
    let routes: Vec<&str> = r2.routes.iter().map(|r| r.executor.as_str()).collect();
    assert_eq!(routes, ["gateway", "clipft", "clipft"]);
    text.shutdown().await?;
    vision.shutdown().await
}

/// A few hundred bytes of PNG with an extreme aspect ratio: resizing the short side to 224
/// before cropping would take 30 GB for 200000x1 (the process aborted); only the crop is
/// resampled, so each is embedded like any other image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thin_strips_are_embedded_in_bounded_memory() -> R {
    let served = Served::start(
        Towers::VISION,
        ExecutorOptions::default(),
        ServerConfig::default(),
    )
    .await?;
    let mut sent = Vec::new();
    for (i, (w, h)) in [(200_000u32, 1u32), (1, 200_000), (16_000, 1), (2400, 40)]
        .into_iter()
        .enumerate()
    {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 7) as u8])
        });
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        sent.push(blob_doc(&format!("strip{i}"), png));
    }
    let reply = served
        .single()
        .process_single_data(request("/encode", sent, vec![]))
        .await?
        .into_inner();
    assert!(error_of(&reply).is_none(), "{:?}", error_of(&reply));
    for d in docs(&reply) {
        assert!(emb(d).is_some(), "{} has no embedding", d.id);
    }
    served.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_documents_fail_in_band_and_the_next_request_succeeds() -> R {
    let root = tempdir("image-root")?;
    std::fs::write(root.join("ok.png"), image_bytes("rgb_90x70.bmp"))?;
    let opts = ExecutorOptions {
        images: ImagePolicy {
            root: Some(root.canonicalize()?),
            ..Default::default()
        },
        max_request_docs: 5,
        ..Default::default()
    };
    let served =
        Served::start_with(Towers::ALL, Some(300 * 300), opts, ServerConfig::default()).await?;
    let outside = fixtures().join("reference/images/rgb_224x224.png");
    let bad: Vec<(&str, DocumentProto, &str)> = vec![
        (
            "undecodable",
            blob_doc("x", b"not an image at all".to_vec()),
            "BadDocumentError",
        ),
        (
            "dtype",
            DocumentProto {
                id: "x".into(),
                content: Some(Content::Tensor(ndarray::numpy(
                    vec![0; 16],
                    vec![2, 2, 1],
                    "<i4",
                ))),
                ..Default::default()
            },
            "BadDocumentError",
        ),
        (
            "too many pixels",
            blob_doc("x", image_bytes("rgb_640x480.png")),
            "BadDocumentError",
        ),
        (
            "outside root",
            DocumentProto {
                id: "x".into(),
                uri: outside.display().to_string(),
                ..Default::default()
            },
            "BadDocumentError",
        ),
        (
            "traversal",
            DocumentProto {
                id: "x".into(),
                uri: "../../etc/passwd".into(),
                ..Default::default()
            },
            "BadDocumentError",
        ),
        (
            "http off",
            DocumentProto {
                id: "x".into(),
                uri: "http://127.0.0.1:9/x.png".into(),
                ..Default::default()
            },
            "BadDocumentError",
        ),
    ];
    let mut client = JinaRpcClient::new(served.channel.clone());
    for (label, doc, name) in bad {
        let sent = request("/encode", vec![text_doc("fine", "ok"), doc], vec![]);
        let reply = served.single().process_single_data(sent.clone()).await?;
        assert_eq!(
            reply
                .metadata()
                .get("is-error")
                .map(|v| v.to_str().unwrap_or("")),
            Some("true"),
            "{label}: trailer"
        );
        let reply = reply.into_inner();
        let (got, msg) = error_of(&reply).ok_or(format!("{label}: no error"))?;
        assert_eq!(got, name, "{label}: {msg}");
        assert!(
            msg.contains("docs[1]") && msg.contains("\"x\""),
            "{label}: names the document: {msg}"
        );
        assert_eq!(
            docs(&reply),
            docs(&sent),
            "{label}: documents come back as sent"
        );
        // The same over the stream, then a good request on the same stream.
        let good = request("/encode", vec![text_doc("fine", "ok")], vec![]);
        let mut stream = client
            .call(futures_util::stream::iter(vec![sent, good]))
            .await?
            .into_inner();
        let mut replies = Vec::new();
        while let Some(r) = stream.message().await? {
            replies.push(r);
        }
        assert_eq!(replies.len(), 2, "{label}");
        assert_eq!(
            replies.iter().filter(|r| error_of(r).is_some()).count(),
            1,
            "{label}"
        );
        let trailers = stream.trailers().await?.ok_or("trailers")?;
        assert_eq!(
            trailers.get("is-error").map(|v| v.to_str().unwrap_or("")),
            Some("true")
        );
    }
    // A file under the root is read.
    let reply = served
        .single()
        .process_single_data(request(
            "/encode",
            vec![DocumentProto {
                id: "ok".into(),
                uri: "ok.png".into(),
                ..Default::default()
            }],
            vec![],
        ))
        .await?;
    assert!(reply.metadata().get("is-error").is_none());
    assert!(
        emb(&docs(reply.get_ref())[0]).is_some(),
        "{:?}",
        error_of(reply.get_ref())
    );
    // Pickled payloads are refused, as is a request over --max-request-docs.
    let mut pickled = request("/encode", vec![], vec![]);
    pickled.data = Some(DataContentProto {
        documents: Some(Documents::DocsBytes(vec![0x80, 0x04].into())),
    });
    let reply = served
        .single()
        .process_single_data(pickled)
        .await?
        .into_inner();
    assert_eq!(
        error_of(&reply).ok_or("pickle")?.0,
        "UnsupportedPayloadError"
    );
    let many: Vec<DocumentProto> = (0..6).map(|i| text_doc(&format!("{i}"), "t")).collect();
    let reply = served
        .single()
        .process_single_data(request("/encode", many, vec![]))
        .await?
        .into_inner();
    assert_eq!(
        error_of(&reply).ok_or("too many")?.0,
        "RequestTooLargeError"
    );
    // Text longer than the limit.
    let long = "word ".repeat((1 << 20) / 5 + 1);
    let reply = served
        .single()
        .process_single_data(request("/encode", vec![text_doc("long", &long)], vec![]))
        .await?
        .into_inner();
    assert_eq!(error_of(&reply).ok_or("long text")?.0, "BadDocumentError");
    let reply = served
        .single()
        .process_single_data(request("/encode", vec![text_doc("a", "fine")], vec![]))
        .await?
        .into_inner();
    assert!(error_of(&reply).is_none());
    served.shutdown().await
}

/// Starts one job of `n` long texts straight on the text tower's queue, to keep its worker busy.
fn hog_text_tower(
    served: &Served,
    n: usize,
) -> R<tokio::task::JoinHandle<Result<usize, clipft::executor::ExecutorError>>> {
    let batcher = served.core.text.clone().ok_or("text")?;
    let long_text = "many words in a long caption ".repeat(12);
    let tok = served.encoder.tokenizer()?.clone();
    let rows: Vec<_> = (0..n)
        .map(|_| {
            tok.encode(&long_text)
                .map(clipft::executor::batcher::Input::Tokens)
        })
        .collect::<Result<_, _>>()?;
    Ok(tokio::spawn(async move {
        batcher.embed(rows, None, true).await.map(|r| r.len())
    }))
}

fn tempdir(name: &str) -> R<PathBuf> {
    let d = std::env::temp_dir().join(format!("clipft-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_size_limit_is_a_clear_error() -> R {
    let server = ServerConfig {
        max_message_bytes: 64 << 10,
        ..Default::default()
    };
    let served = Served::start(Towers::ALL, ExecutorOptions::default(), server).await?;
    let big = blob_doc("big", vec![7u8; 100 << 10]);
    let err = served
        .single()
        .process_single_data(request("/encode", vec![big], vec![]))
        .await;
    let status = err.err().ok_or("expected the call to fail")?;
    assert!(
        status.message().contains("too large") || status.message().contains("limit"),
        "{status:?}"
    );
    let reply = served
        .single()
        .process_single_data(request("/encode", vec![text_doc("a", "fine")], vec![]))
        .await?;
    assert!(error_of(reply.get_ref()).is_none());
    served.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_data_stream_doc_discovery_status_dry_run() -> R {
    let served = Served::default().await?;
    // process_data merges the parts' documents into one reply.
    let parts = DataRequestListProto {
        requests: vec![
            request("/encode", vec![text_doc("p1", "one")], vec![]),
            request(
                "/encode",
                vec![text_doc("p2", "two"), text_doc("p3", "three")],
                vec![],
            ),
        ],
    };
    let reply = JinaDataRequestRpcClient::new(served.channel.clone())
        .process_data(parts)
        .await?
        .into_inner();
    let ids: Vec<&str> = docs(&reply).iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["p1", "p2", "p3"]);
    assert!(docs(&reply).iter().all(|d| d.embedding.is_some()));
    // stream_doc answers one document.
    let single = SingleDocumentRequestProto {
        header: Some(HeaderProto {
            request_id: "sd".into(),
            exec_endpoint: Some("/encode".into()),
            ..Default::default()
        }),
        parameters: None,
        routes: vec![],
        document: Some(text_doc("one", "a shirt")),
    };
    let mut stream = JinaSingleDocumentRequestRpcClient::new(served.channel.clone())
        .stream_doc(single)
        .await?
        .into_inner();
    let first = stream.message().await?.ok_or("stream_doc reply")?;
    assert!(stream.message().await?.is_none());
    assert_eq!(first.document.as_ref().map(|d| d.id.as_str()), Some("one"));
    assert!(first.document.as_ref().and_then(emb).is_some());
    // Discovery: the catch-all makes a gateway send everything here.
    let eps = JinaDiscoverEndpointsRpcClient::new(served.channel.clone())
        .endpoint_discovery(())
        .await?
        .into_inner();
    for e in ["/default", "/encode", "/rank", "_jina_dry_run_"] {
        assert!(eps.endpoints.iter().any(|x| x == e), "{e}");
    }
    let info = JinaInfoRpcClient::new(served.channel.clone())
        .status(())
        .await?
        .into_inner();
    assert_eq!(
        info.jina.get("jina-proto").map(String::as_str),
        Some("0.1.27")
    );
    assert!(info.envs.contains_key("JINA_LOG_LEVEL"));
    let dry = JinaGatewayDryRunRpcClient::new(served.channel.clone())
        .dry_run(())
        .await?
        .into_inner();
    assert_eq!(dry.code, 0);
    // The dry-run endpoint is a no-op that still answers.
    let reply = served
        .single()
        .process_single_data(request(
            "_jina_dry_run_",
            vec![DocumentProto::default()],
            vec![],
        ))
        .await?
        .into_inner();
    assert!(error_of(&reply).is_none() && docs(&reply)[0].embedding.is_none());
    served.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_v1alpha_and_v1() -> R {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let served = Served::default().await?;
    let mut health = HealthClient::new(served.channel.clone());
    for service in ["", "jina.JinaRPC", "jina.JinaSingleDataRequestRPC"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        assert_eq!(r.status, 1, "{service}: SERVING");
    }
    // v1alpha, as the Jina gateway asks.
    {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut c = ServerReflectionClient::new(served.channel.clone());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = c
            .server_reflection_info(futures_util::stream::iter(vec![req]))
            .await?
            .into_inner();
        let r = stream.message().await?.ok_or("reflection reply")?;
        let Some(MessageResponse::ListServicesResponse(list)) = r.message_response else {
            return Err("no list".into());
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for want in [
            "jina.JinaRPC",
            "jina.JinaDataRequestRPC",
            "jina.JinaSingleDataRequestRPC",
            "jina.JinaSingleDocumentRequestRPC",
            "jina.JinaDiscoverEndpointsRPC",
            "jina.JinaInfoRPC",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert!(
            !names.iter().any(|n| n.contains("Snapshot")),
            "only served services are listed: {names:?}"
        );
        // The descriptors resolve, so grpcurl-style tools work.
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol("jina.JinaRPC".into())),
        };
        let mut stream = c
            .server_reflection_info(futures_util::stream::iter(vec![req]))
            .await?
            .into_inner();
        let r = stream.message().await?.ok_or("reflection reply")?;
        assert!(
            matches!(
                r.message_response,
                Some(MessageResponse::FileDescriptorResponse(_))
            ),
            "{:?}",
            r.message_response
        );
    }
    {
        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut c = ServerReflectionClient::new(served.channel.clone());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = c
            .server_reflection_info(futures_util::stream::iter(vec![req]))
            .await?
            .into_inner();
        let r = stream.message().await?.ok_or("reflection reply")?;
        assert!(matches!(
            r.message_response,
            Some(MessageResponse::ListServicesResponse(_))
        ));
    }
    served.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_many_streams_batch_together() -> R {
    let opts = ExecutorOptions {
        minibatch_size: 16,
        ..Default::default()
    };
    let served = Served::start(Towers::ALL, opts, ServerConfig::default()).await?;
    let mut tasks = Vec::new();
    for c in 0..8 {
        let channel = served.channel.clone();
        tasks.push(tokio::spawn(async move {
            let reqs: Vec<DataRequestProto> = (0..8)
                .map(|r| {
                    request(
                        "/encode",
                        (0..2)
                            .map(|i| {
                                text_doc(
                                    &format!("{c}-{r}-{i}"),
                                    &format!("text number {i} of {r}"),
                                )
                            })
                            .collect(),
                        vec![],
                    )
                })
                .collect();
            let mut stream = JinaRpcClient::new(channel)
                .call(futures_util::stream::iter(reqs))
                .await?
                .into_inner();
            let mut n = 0;
            while let Some(r) = stream.message().await? {
                n += docs(&r).iter().filter(|d| d.embedding.is_some()).count();
            }
            Ok::<usize, tonic::Status>(n)
        }));
    }
    for t in tasks {
        assert_eq!(t.await??, 16);
    }
    let stats = &served.core.text.as_ref().ok_or("text")?.stats;
    let batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed);
    let items = stats.items.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(items, 128);
    assert!(
        batches < 64,
        "128 texts in 2-text requests ran in {batches} batches: requests were batched together"
    );
    assert!(stats.max_batch.load(std::sync::atomic::Ordering::Relaxed) <= 16);
    served.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_bigger_than_the_queue_run_in_chunks_in_order() -> R {
    let opts = ExecutorOptions {
        queue_depth: 4,
        minibatch_size: 8,
        ..Default::default()
    };
    let served = Served::start(Towers::ALL, opts, ServerConfig::default()).await?;
    let texts: Vec<String> = (0..11)
        .map(|i| format!("caption number {i} of eleven"))
        .collect();
    let pre = served.encoder.image_preprocessor()?.clone();
    let images: Vec<Vec<u8>> = [
        "rgb_300x200.png",
        "rgb_224x224.png",
        "rgb_640x480.png",
        "rgb_90x70.bmp",
        "rgb_224x224.png",
    ]
    .iter()
    .map(|n| image_bytes(n))
    .collect();
    let mut sent: Vec<DocumentProto> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| text_doc(&format!("t{i}"), t))
        .collect();
    sent.extend(
        images
            .iter()
            .enumerate()
            .map(|(i, b)| blob_doc(&format!("i{i}"), b.clone())),
    );
    // Unary: only the first chunk may be refused by a full queue; this one is empty.
    let reply = served
        .single()
        .process_single_data(request("/encode", sent, vec![]))
        .await?
        .into_inner();
    assert!(error_of(&reply).is_none(), "{:?}", error_of(&reply));
    let got = docs(&reply);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let want_texts = served.encoder.embed_texts(&refs)?;
    for (i, want) in want_texts.iter().enumerate() {
        let e = emb(&got[i]).ok_or("text embedding")?;
        assert!(close(&e, want), "text {i} out of order or wrong");
    }
    for (i, b) in images.iter().enumerate() {
        let px = pre.preprocess_bytes(b)?;
        let want = served.encoder.embed_pixels(&[px])?;
        let e = emb(&got[texts.len() + i]).ok_or("image embedding")?;
        assert!(close(&e, &want[0]), "image {i} out of order or wrong");
    }
    let stats = |t: &Option<clipft::executor::batcher::Batcher>| -> R<usize> {
        Ok(t.as_ref()
            .ok_or("tower")?
            .stats
            .jobs
            .load(std::sync::atomic::Ordering::Relaxed) as usize)
    };
    // Chunks of half the queue: 11 texts in 6 jobs, 5 images in 3.
    assert_eq!(stats(&served.core.text)?, 6);
    assert_eq!(stats(&served.core.vision)?, 3);
    served.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_pushes_back() -> R {
    let opts = ExecutorOptions {
        queue_depth: 4,
        minibatch_size: 4,
        max_request_docs: 1_000_000,
        ..Default::default()
    };
    let served = Served::start(Towers::ALL, opts, ServerConfig::default()).await?;
    let batcher = served.core.text.clone().ok_or("text")?;
    // A long job that takes the whole queue (it is bigger than the queue).
    let hog = hog_text_tower(&served, 4000)?;
    while batcher.queued() < 4 {
        tokio::task::yield_now().await;
    }
    // Unary calls are refused while it runs...
    let refused = served
        .single()
        .process_single_data(request("/encode", vec![text_doc("a", "x")], vec![]))
        .await;
    let status = refused.err().ok_or("expected RESOURCE_EXHAUSTED")?;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("queue is full"));
    // ...streams wait and then succeed.
    let mut stream = JinaRpcClient::new(served.channel.clone())
        .call(futures_util::stream::iter(vec![request(
            "/encode",
            vec![text_doc("b", "y")],
            vec![],
        )]))
        .await?
        .into_inner();
    let r = stream.message().await?.ok_or("stream reply")?;
    assert!(emb(&docs(&r)[0]).is_some());
    assert_eq!(hog.await??, 4000);
    assert_eq!(batcher.queued(), 0);
    served.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_stops_reading_holds_no_queue_room() -> R {
    let opts = ExecutorOptions {
        queue_depth: 4,
        minibatch_size: 4,
        ..Default::default()
    };
    let served = Served::start(Towers::ALL, opts, ServerConfig::default()).await?;
    let batcher = served.core.text.clone().ok_or("text")?;
    // A client on its own connection sends request after request, each the whole queue, and
    // never reads a reply: its replies fill the HTTP/2 window and then the server's reply
    // channel, and the server stops writing to it.
    let stalled = tonic::transport::Endpoint::from_shared(format!("http://{}", served.addr))?
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await?;
    let sent = 300;
    let (tx, rx) = tokio::sync::mpsc::channel(sent);
    let caption = "a long caption with many words in it ".repeat(6);
    for r in 0..sent {
        let docs = (0..4)
            .map(|i| text_doc(&format!("{r}-{i}"), &format!("{caption}{r}")))
            .collect();
        tx.send(request("/encode", docs, vec![])).await?;
    }
    let call = JinaRpcClient::new(stalled)
        .call(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    // Until the server stops computing for it (documents computed stop growing).
    let jobs = || {
        batcher
            .stats
            .items
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut last = u64::MAX;
    for _ in 0..600 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let now = jobs();
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    assert!(
        (jobs() as usize) < 4 * sent,
        "the server computed all {sent} requests: the reader never stalled it, so this test shows nothing"
    );
    // Other clients are served: no request of the stalled stream holds the queue.
    for i in 0..3 {
        let reply = served
            .single()
            .process_single_data(request("/encode", vec![text_doc("other", "fine")], vec![]))
            .await
            .map_err(|e| format!("call {i} while a client stalls its stream: {e:?}"))?;
        assert!(emb(&docs(reply.get_ref())[0]).is_some());
    }
    assert_eq!(batcher.queued(), 0, "nothing holds queue room");
    drop(call);
    drop(tx);
    served.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_are_dropped_before_compute() -> R {
    let opts = ExecutorOptions {
        queue_depth: 10_000,
        minibatch_size: 8,
        ..Default::default()
    };
    let served = Served::start(Towers::ALL, opts, ServerConfig::default()).await?;
    let batcher = served.core.text.clone().ok_or("text")?;
    // Keep the worker busy, queue a streamed request behind it and walk away from it.
    let hog = hog_text_tower(&served, 3000)?;
    while batcher.queued() < 3000 {
        tokio::task::yield_now().await;
    }
    {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(request(
            "/encode",
            vec![text_doc("gone", "never read")],
            vec![],
        ))
        .await?;
        let call = JinaRpcClient::new(served.channel.clone())
            .call(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?;
        while batcher
            .stats
            .jobs
            .load(std::sync::atomic::Ordering::Relaxed)
            < 2
        {
            tokio::task::yield_now().await;
        }
        drop(call);
        drop(tx);
    }
    assert_eq!(hog.await??, 3000);
    let stats = &batcher.stats;
    let mut spins = 0;
    while stats.abandoned.load(std::sync::atomic::Ordering::Relaxed) == 0 && spins < 500 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        spins += 1;
    }
    assert_eq!(
        stats.abandoned.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the abandoned request was dropped"
    );
    assert_eq!(
        stats.items.load(std::sync::atomic::Ordering::Relaxed),
        3000,
        "and never computed"
    );
    let reply = served
        .single()
        .process_single_data(request("/encode", vec![text_doc("next", "fine")], vec![]))
        .await?;
    assert!(emb(&docs(reply.get_ref())[0]).is_some());
    assert_eq!(batcher.queued(), 0);
    served.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_images_are_fetched_only_when_allowed_and_within_limits() -> R {
    let png = image_bytes("rgb_224x224.png");
    let base = common::http_server(png.clone())?;
    let uri_doc = |id: &str, path: &str| DocumentProto {
        id: id.into(),
        uri: format!("{base}{path}"),
        ..Default::default()
    };
    let opts = ExecutorOptions {
        images: ImagePolicy {
            allow_http: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let served = Served::start(Towers::ALL, opts, ServerConfig::default()).await?;
    let pre = served.encoder.image_preprocessor()?.clone();
    let want = served
        .encoder
        .embed_pixels(&[pre.preprocess_bytes(&png)?])?
        .remove(0);
    let reply = served
        .single()
        .process_single_data(request("/encode", vec![uri_doc("ok", "/img.png")], vec![]))
        .await?
        .into_inner();
    assert!(close(&emb(&docs(&reply)[0]).ok_or("fetched image")?, &want));
    let reply = served
        .single()
        .process_single_data(request(
            "/encode",
            vec![uri_doc("missing", "/nope.png")],
            vec![],
        ))
        .await?
        .into_inner();
    let (name, msg) = error_of(&reply).ok_or("404")?;
    assert_eq!(name, "BadDocumentError");
    assert!(msg.contains("nope.png"), "{msg}");
    served.shutdown().await?;
    // Over the size limit, and from a host the policy refuses (this server is on loopback).
    let limited = |http: HttpFetch| ExecutorOptions {
        images: ImagePolicy {
            allow_http: true,
            http,
            ..Default::default()
        },
        ..Default::default()
    };
    let default = ImagePolicy::default().http;
    for (http, want) in [
        (
            HttpFetch {
                max_bytes: 100,
                ..default
            },
            "limit 100 bytes",
        ),
        (
            HttpFetch {
                hosts: ImageHosts::Public,
                ..default
            },
            "loopback",
        ),
    ] {
        let served = Served::start(Towers::ALL, limited(http), ServerConfig::default()).await?;
        let reply = served
            .single()
            .process_single_data(request("/encode", vec![uri_doc("x", "/img.png")], vec![]))
            .await?
            .into_inner();
        let (name, msg) = error_of(&reply).ok_or(want)?;
        assert_eq!(name, "BadDocumentError");
        assert!(msg.contains(want), "{msg}");
        served.shutdown().await?;
    }
    Ok(())
}

/// A document carrying `bytes` of tags besides its `content`: it holds that much while in flight.
fn heavy(id: &str, content: DocumentProto, bytes: usize) -> DocumentProto {
    DocumentProto {
        id: id.into(),
        tags: Some(to_struct([("pad", s(&"x".repeat(bytes)))])),
        ..content
    }
}

/// Requests in flight share one memory budget (`--max-inflight-bytes`): while one holds most
/// of it, a unary call that would go over is refused naming the flag, a streamed request waits
/// for room and then runs, and every byte is given back once the requests are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_share_one_memory_budget() -> R {
    use std::io::{Read, Write};
    // An image server that answers when told to: the request fetching from it stays in flight.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    let (release, released) = std::sync::mpsc::channel::<()>();
    let png = image_bytes("rgb_224x224.png");
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut buf = [0u8; 2048];
        let _ = s.read(&mut buf);
        let _ = released.recv();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            png.len()
        );
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(&png);
    });
    let mb = 1 << 20;
    let opts = ExecutorOptions {
        max_inflight_bytes: 3 * mb as u64 / 2,
        images: ImagePolicy {
            allow_http: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let served = Served::start(Towers::ALL, opts, ServerConfig::default()).await?;
    let inflight = &served.core.inflight;
    let slow = heavy(
        "slow",
        DocumentProto {
            uri: format!("{base}/img.png"),
            ..Default::default()
        },
        mb,
    );
    let first = tokio::spawn({
        let mut client = served.single();
        async move {
            client
                .process_single_data(request("/encode", vec![slow], vec![]))
                .await
        }
    });
    for _ in 0..1000 {
        if inflight.held() > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let held = inflight.held();
    assert!(held > mb as u64 && held < inflight.limit(), "{held}");

    // A unary call that does not fit is refused, naming the flag.
    let big_text = || heavy("t", text_doc("t", "a photo"), mb);
    let refused = served
        .single()
        .process_single_data(request("/encode", vec![big_text()], vec![]))
        .await
        .err()
        .ok_or("a unary call over the budget was served")?;
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("--max-inflight-bytes"),
        "{refused:?}"
    );
    // A dry run (a gateway's readiness probe) holds nothing and is answered.
    let dry = served
        .single()
        .process_single_data(request("_jina_dry_run_", vec![big_text()], vec![]))
        .await?
        .into_inner();
    assert!(error_of(&dry).is_none(), "{:?}", error_of(&dry));
    // One that fits is served meanwhile.
    let small = served
        .single()
        .process_single_data(request("/encode", vec![text_doc("s", "a dog")], vec![]))
        .await?
        .into_inner();
    assert!(emb(&docs(&small)[0]).is_some());

    // A streamed request waits for room...
    let mut stream = JinaRpcClient::new(served.channel.clone())
        .call(futures_util::stream::iter(vec![request(
            "/encode",
            vec![big_text()],
            vec![],
        )]))
        .await?
        .into_inner();
    let waited =
        tokio::time::timeout(std::time::Duration::from_millis(500), stream.message()).await;
    assert!(waited.is_err(), "the streamed request ran over the budget");
    // ...and runs once the first request is done.
    release.send(())?;
    let first = first.await??.into_inner();
    assert!(emb(&docs(&first)[0]).is_some(), "{:?}", error_of(&first));
    let r = stream.message().await?.ok_or("stream reply")?;
    assert!(emb(&docs(&r)[0]).is_some(), "{:?}", error_of(&r));
    assert_eq!(inflight.held(), 0, "every request gave its bytes back");
    served.shutdown().await
}
