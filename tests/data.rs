//! Datasets and evaluation against references written by the real docarray v1 and Finetuner's
//! rules (scripts/make_data_fixtures.py): metric values, a whole evaluation, CSV datasets.

use std::path::{Path, PathBuf};

use clipft::docarray::csv::CsvRows;
use clipft::docarray::{ImageSource, Pair};
use clipft::eval::metrics::{self, Metrics};
use clipft::eval::{evaluate, LabeledEmbeddings};
use serde_json::Value;

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
