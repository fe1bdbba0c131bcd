//! Datasets and evaluation against references written by the real docarray v1 and Finetuner's
//! rules (scripts/make_data_fixtures.py): metric values, a whole evaluation, CSV datasets.

use std::path::{Path, PathBuf};

use clipft::docarray::csv::CsvRows;
use clipft::docarray::{HttpFetch, ImageSource, Pair};
use clipft::eval::metrics::{self, Metrics};
use clipft::eval::{evaluate, LabeledEmbeddings};
use serde_json::Value;

mod common;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data_dir().join(name)).unwrap()).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

#[test]
fn metrics_match_docarray_v1() {
    let cases = json("metrics.json");
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (Some(max_rel), k) = (case["max_rel"].as_u64(), &case["k"]) else {
            continue;
        };
        // Negative k cannot be expressed here (it is rejected when parsed).
        if k.as_i64().is_some_and(|k| k < 0) {
            continue;
        }
        let k = k.as_u64().map(|k| k as usize);
        let raw: Vec<f64> = case["r"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        // Graded relevance never comes out of an evaluation (relevance is label equality).
        if raw.iter().any(|v| *v != 0.0 && *v != 1.0) {
            continue;
        }
        let r: Vec<bool> = raw.iter().map(|v| *v != 0.0).collect();
        let m = max_rel as usize;
        let ours: [(&str, Result<f64, metrics::MetricError>); 9] = [
            ("average_precision", Ok(metrics::average_precision(&r))),
            ("dcg_at_k", metrics::dcg_at_k(&r, k)),
            ("f1_score_at_k", metrics::f1_score_at_k(&r, m, k)),
            ("hit_at_k", metrics::hit_at_k(&r, k)),
            ("ndcg_at_k", metrics::ndcg_at_k(&r, k)),
            ("precision_at_k", metrics::precision_at_k(&r, k)),
            ("r_precision", Ok(metrics::r_precision(&r))),
            ("recall_at_k", metrics::recall_at_k(&r, m, k)),
            ("reciprocal_rank", Ok(metrics::reciprocal_rank(&r))),
        ];
        for (metric, got) in ours {
            let want = &case["values"][metric];
            match (want.as_f64(), want.get("error"), want.get("nonfinite"), got) {
                (Some(w), _, _, Ok(g)) => {
                    assert!(close(g, w), "{name}: {metric} = {g}, docarray {w}")
                }
                (_, Some(_), _, Err(_)) => {}
                (_, _, Some(_), Ok(g)) => {
                    assert!(g.is_nan(), "{name}: {metric} = {g}, docarray NaN")
                }
                (_, _, _, got) => panic!("{name}: {metric}: ours {got:?}, docarray {want}"),
            }
            checked += 1;
        }
    }
    assert!(checked > 400, "{checked}");
}

fn embeddings(v: &Value) -> LabeledEmbeddings {
    let items = v.as_array().unwrap();
    let dim = items[0]["embedding"].as_array().unwrap().len();
    let mut e = LabeledEmbeddings {
        dim,
        ..Default::default()
    };
    for it in items {
        e.ids.push(it["id"].as_str().unwrap().to_string());
        let label = &it["label"];
        e.labels.push(
            label
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| label.to_string()),
        );
        e.embeddings.extend(
            it["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32),
        );
    }
    e
}

fn check_evaluation(case: &Value) {
    let q = embeddings(&case["queries"]);
    let x = embeddings(&case["index"]);
    let limit = case["limit"].as_u64().unwrap() as usize;
    let ev = evaluate(&q, &x, limit, case["exclude_self"].as_bool().unwrap()).unwrap();
    for (name, value) in ev.mean.named() {
        let want = case["metrics"][name].as_f64().unwrap();
        assert!(
            (value - want).abs() < 1e-9,
            "{name}: {value} vs docarray {want}"
        );
    }
    for (got, want) in ev
        .per_query
        .iter()
        .zip(case["per_query"].as_array().unwrap())
    {
        let ids: Vec<&str> = got.matches.iter().map(|i| x.ids[*i].as_str()).collect();
        let want_ids: Vec<&str> = want["match_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(ids, want_ids, "query {}", want["id"]);
    }
}

#[test]
fn evaluation_matches_docarray_v1() {
    let case = json("eval_case.json");
    check_evaluation(&case);
    check_evaluation(&case["self_match_case"]);
}

/// Finetuner's EvaluationCallback(distance='euclidean' | 'sqeuclidean'): docarray v1's order of
/// the matches, distances and metrics on eval_case.json's embeddings, where every query ranks
/// otherwise than by cosine (scripts/make_distance_fixture.py).
#[test]
fn euclidean_evaluation_matches_docarray_v1() {
    use clipft::eval::{evaluate_by, Distance};
    let case = json("eval_case.json");
    let want = json("eval_distances.json");
    let q = embeddings(&case["queries"]);
    let x = embeddings(&case["index"]);
    let limit = want["limit"].as_u64().unwrap() as usize;
    let exclude_self = want["exclude_self"].as_bool().unwrap();
    for (name, distance) in [
        ("euclidean", Distance::Euclidean),
        ("sqeuclidean", Distance::Sqeuclidean),
    ] {
        let w = &want["distances"][name];
        let ev = evaluate_by(&q, &x, limit, exclude_self, distance).unwrap();
        for (metric, value) in ev.mean.named() {
            let expect = w["metrics"][metric].as_f64().unwrap();
            assert!(
                (value - expect).abs() < 1e-9,
                "{name} {metric}: {value} vs docarray {expect}"
            );
        }
        for (got, expect) in ev.per_query.iter().zip(w["per_query"].as_array().unwrap()) {
            let ids: Vec<&str> = got.matches.iter().map(|i| x.ids[*i].as_str()).collect();
            let want_ids: Vec<&str> = expect["match_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(ids, want_ids, "{name}, query {}", expect["id"]);
            let d0 = expect["distances"][0].as_f64().unwrap();
            assert!(
                (got.scores[0] - d0).abs() <= 1e-6 * d0.max(1.0),
                "{name}: {} vs {d0}",
                got.scores[0]
            );
        }
    }
}

#[test]
fn mean_of_metrics() {
    let a = Metrics {
        precision_at_k: 1.0,
        ..Default::default()
    };
    let b = Metrics {
        precision_at_k: 0.0,
        hit_at_k: 1.0,
        ..Default::default()
    };
    let m = Metrics::mean(&[a, b]);
    assert_eq!((m.precision_at_k, m.hit_at_k), (0.5, 0.5));
}

fn read_pairs(path: &Path) -> Result<Vec<Pair>, clipft::docarray::DataError> {
    CsvRows::open(path)?.pairs().collect()
}

#[test]
fn csv_datasets_as_expected() {
    let expected = json("expected_csv.json");
    let dir = data_dir();
    let tmp = std::env::temp_dir().join(format!("clipft-data-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for (file, spec) in expected["files"].as_object().unwrap() {
        let mut path = dir.join(file);
        if spec["template"].as_bool() == Some(true) {
            // Absolute paths differ per machine: fill the template in.
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("{ROOT}", dir.to_str().unwrap());
            path = tmp.join(file);
            std::fs::write(&path, text).unwrap();
        }
        let got = read_pairs(&path);
        let Some(rows) = spec["rows"].as_array() else {
            assert!(got.is_err(), "{file} should fail: {}", spec["error"]);
            continue;
        };
        let got = got.unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(got.len(), rows.len(), "{file}");
        for (g, w) in got.iter().zip(rows) {
            assert_eq!(g.caption, w["caption"].as_str().unwrap(), "{file}");
            let image = w["image"]
                .as_str()
                .unwrap()
                .replace("{ROOT}", dir.to_str().unwrap());
            match &g.image.source {
                ImageSource::Path(p) => {
                    let want = if Path::new(&image).is_absolute() {
                        PathBuf::from(&image)
                    } else {
                        dir.join(&image)
                    };
                    assert_eq!(p, &want, "{file}");
                    assert_eq!(p.exists(), w["image_exists"].as_bool().unwrap(), "{file}");
                }
                ImageSource::DataUri(u) => assert_eq!(u, &image, "{file}"),
                other => panic!("{file}: unexpected {other:?}"),
            }
            assert_eq!(g.label.as_deref(), w["label"].as_str(), "{file}");
        }
    }
}

mod docarray_files {
    use super::*;
    use clipft::docarray::file::{self, DocReader};
    use clipft::docarray::proto::{document_proto::Content, DocumentProto};
    use clipft::docarray::{Item, Modality};

    fn check_doc(file: &str, got: &DocumentProto, want: &Value) {
        assert_eq!(got.id, want["id"].as_str().unwrap(), "{file}");
        match (&got.content, want["text"].as_str()) {
            (Some(Content::Text(t)), Some(w)) => assert_eq!(t, w, "{file}"),
            (Some(Content::Text(t)), None) => panic!("{file}: unexpected text {t:?}"),
            (_, Some(w)) => assert_eq!(w, "", "{file}: missing text"),
            _ => {}
        }
        assert_eq!(
            got.modality,
            want["modality"].as_str().unwrap_or(""),
            "{file}"
        );
        assert_eq!(got.uri, want["uri"].as_str().unwrap_or(""), "{file}");
        assert_eq!(
            got.mime_type,
            want["mime_type"].as_str().unwrap_or(""),
            "{file}"
        );
        match (&got.content, want["blob_len"].as_u64()) {
            (Some(Content::Blob(b)), Some(n)) => {
                assert_eq!(b.len() as u64, n, "{file}");
                assert!(
                    b.starts_with(b"\x89PNG"),
                    "{file}: blob is not the PNG written"
                );
            }
            (Some(Content::Blob(_)), None) => panic!("{file}: unexpected blob"),
            (_, Some(_)) => panic!("{file}: missing blob"),
            _ => {}
        }
        if let Some(t) = want["tensor"].as_object() {
            let Some(Content::Tensor(nd)) = &got.content else {
                panic!("{file}: missing tensor")
            };
            let dense = match &nd.content {
                Some(clipft::docarray::proto::nd_array_proto::Content::Dense(d)) => d,
                _ => panic!("{file}: not dense"),
            };
            let shape: Vec<u64> = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(
                dense.shape.iter().map(|s| *s as u64).collect::<Vec<_>>(),
                shape,
                "{file}"
            );
        }
        assert_eq!(
            got.parent_id,
            want["parent_id"].as_str().unwrap_or(""),
            "{file}"
        );
        let label = want["tags"]["finetuner_label"].clone();
        let ours = file::finetuner_label(got);
        match label {
            Value::String(s) => assert_eq!(ours.as_deref(), Some(s.as_str()), "{file}"),
            Value::Number(n) => assert_eq!(
                ours.unwrap().parse::<f64>().unwrap(),
                n.as_f64().unwrap(),
                "{file}"
            ),
            _ => assert!(ours.is_none(), "{file}"),
        }
        let chunks = want["chunks"].as_array().unwrap();
        assert_eq!(got.chunks.len(), chunks.len(), "{file}");
        for (g, w) in got.chunks.iter().zip(chunks) {
            check_doc(file, g, w);
        }
    }

    #[test]
    fn every_protocol_and_compression_reads_as_docarray_wrote_it() {
        let expected = json("expected_train.json");
        let files = expected["files"].as_object().unwrap();
        assert!(files.len() >= 14);
        for (file, spec) in files {
            let docs: Vec<DocumentProto> = DocReader::open(&data_dir().join(file))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            let want = spec["docs"].as_array().unwrap();
            assert_eq!(docs.len(), want.len(), "{file}");
            for (g, w) in docs.iter().zip(want) {
                check_doc(file, g, w);
            }
        }
    }

    #[test]
    fn training_pairs_and_labelled_items() {
        let pairs: Vec<_> = file::pairs(&data_dir().join("train.protobuf.lz4.bin"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(pairs.len(), 6);
        assert_eq!(pairs[0].caption, "a red square");
        assert_eq!(pairs[0].label.as_deref(), Some("red"));
        let pre = clipft::model::ImagePreprocessor::new(clipft::model::ImageConfig::default());
        for p in &pairs {
            let px = p
                .image
                .preprocess(&pre, &HttpFetch::DATASET)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(px.len(), 3 * 224 * 224);
        }
        let queries: Vec<_> = file::labeled(
            &data_dir().join("query.protobuf-array.none.bin"),
            Modality::Text,
        )
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
        assert!(queries.iter().all(|q| matches!(q.item, Item::Text(_))));
        let index: Vec<_> = file::labeled(
            &data_dir().join("index.protobuf-array.none.bin"),
            Modality::Image,
        )
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
        assert!(index.iter().all(|q| matches!(q.item, Item::Image(_))));
        assert!(queries
            .iter()
            .all(|q| index.iter().any(|i| i.label == q.label)));
    }

    #[test]
    fn malformed_files_are_refused_with_their_location() {
        let dir = data_dir().join("malformed");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("bin") {
                continue;
            }
            n += 1;
            let result: Result<Vec<_>, _> = DocReader::open(&path).and_then(|r| r.collect());
            let e = result
                .expect_err(&format!("{} should be refused", path.display()))
                .to_string();
            assert!(
                e.contains(path.file_name().unwrap().to_str().unwrap()),
                "{e}"
            );
        }
        assert!(n >= 6, "{n}");
    }

    fn gzip(path: &Path, bytes: &[u8]) {
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(path).unwrap(),
            flate2::Compression::fast(),
        );
        std::io::Write::write_all(&mut gz, bytes).unwrap();
        gz.finish().unwrap();
    }

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("clipft-data-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A record of empty chunks is 2 bytes a chunk stored and some 400 decoded: a 40 KB
    /// gzipped upload of them asked the trainer for 14 GB. Such a document is refused before
    /// it is decoded; a document of real content as large reads.
    #[test]
    fn documents_that_decode_far_larger_than_stored_are_refused() {
        use prost::Message;
        let dir = temp("empty-chunks");
        let doc = [0x72u8, 0x00].repeat(200_000);
        let mut file = vec![0x0a];
        prost::encoding::encode_varint(doc.len() as u64, &mut file);
        file.extend_from_slice(&doc);
        let path = dir.join("chunks.protobuf-array.gzip");
        gzip(&path, &file);
        let e = DocReader::open(&path)
            .and_then(|r| r.collect::<Result<Vec<_>, _>>())
            .expect_err("a document of 200000 empty chunks decoded")
            .to_string();
        assert!(
            e.contains("document 0") && e.contains("empty fields"),
            "{e}"
        );
        let real = DocumentProto {
            chunks: vec![DocumentProto {
                content: Some(Content::Blob(vec![7u8; 400_000].into())),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut file = vec![0x0a];
        prost::encoding::encode_varint(real.encoded_len() as u64, &mut file);
        file.extend_from_slice(&real.encode_to_vec());
        gzip(&path, &file);
        let docs: Vec<_> = DocReader::open(&path)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(docs, vec![real]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// What the trainer asks of pushed docarray data beyond well-formed pairs: it unpacks to no
    /// more than its limit (compression hides the real size), and no image is a file on the
    /// trainer's own disk.
    #[test]
    fn vetting_bounds_unpacked_bytes_and_local_files() {
        use clipft::docarray::{validate_dataset, DataError, Vetting};
        use prost::Message;
        let dir = temp("vetting");
        let png_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/reference/images/rgb_224x224.png");
        let png = std::fs::read(&png_path).unwrap();
        let pair = |image: Content| DocumentProto {
            chunks: vec![
                DocumentProto {
                    content: Some(Content::Text("a red dress".into())),
                    ..Default::default()
                },
                DocumentProto {
                    content: Some(image),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let write = |docs: &[DocumentProto]| {
            let path = dir.join("pairs.protobuf-array.gzip");
            let mut file = Vec::new();
            for d in docs {
                file.push(0x0a);
                prost::encoding::encode_varint(d.encoded_len() as u64, &mut file);
                file.extend_from_slice(&d.encode_to_vec());
            }
            gzip(&path, &file);
            path
        };
        let pre = clipft::model::ImagePreprocessor::new(clipft::model::ImageConfig::default());
        let blobs = write(&vec![pair(Content::Blob(png.clone().into())); 20]);
        assert_eq!(validate_dataset(&blobs, &pre, Vetting::LOCAL).unwrap(), 20);
        let small = Vetting {
            max_unpacked: 5 * png.len() as u64,
            local_files: false,
        };
        match validate_dataset(&blobs, &pre, small) {
            Err(DataError::TooLarge { location, limit }) => {
                assert!(location.ends_with("document 4"), "{location}");
                assert_eq!(limit, small.max_unpacked);
            }
            other => panic!("unpacked past the limit: {other:?}"),
        }
        let mut uri = pair(Content::Blob(Vec::new().into()));
        uri.chunks[1].content = None;
        uri.chunks[1].uri = png_path.display().to_string();
        let local = write(&[pair(Content::Blob(png.into())), uri]);
        assert_eq!(validate_dataset(&local, &pre, Vetting::LOCAL).unwrap(), 2);
        let e = validate_dataset(
            &local,
            &pre,
            Vetting {
                local_files: false,
                ..Vetting::LOCAL
            },
        )
        .expect_err("a local file accepted")
        .to_string();
        assert!(e.contains("document 1") && e.contains("local file"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Dataset images given as http(s) URIs are fetched (size and time limited, from the hosts
/// allowed); a failed fetch names the dataset location and the URI.
#[test]
fn http_image_uris_in_datasets_are_fetched() -> Result<(), Box<dyn std::error::Error>> {
    use clipft::docarray::ImageRef;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/images");
    let png = std::fs::read(root.join("rgb_224x224.png"))?;
    let base = common::http_server(png.clone())?;
    let pre = clipft::model::ImagePreprocessor::new(clipft::model::ImageConfig::default());
    let remote = ImageRef {
        source: ImageSource::Remote(format!("{base}/img.png")),
        location: "train.csv line 2".into(),
    };
    assert_eq!(
        remote.preprocess(&pre, &HttpFetch::DATASET)?,
        pre.preprocess_bytes(&png)?
    );
    let public_only = HttpFetch {
        hosts: clipft::docarray::ImageHosts::Public,
        ..HttpFetch::DATASET
    };
    let err = remote
        .preprocess(&pre, &public_only)
        .err()
        .ok_or("loopback fetched under public hosts")?
        .to_string();
    assert!(err.contains("line 2") && err.contains("loopback"), "{err}");
    let missing = ImageRef {
        source: ImageSource::Remote(format!("{base}/gone.png")),
        location: "train.csv line 3".into(),
    };
    let err = missing
        .preprocess(&pre, &HttpFetch::DATASET)
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(err.contains("line 3") && err.contains("gone.png"), "{err}");
    Ok(())
}
