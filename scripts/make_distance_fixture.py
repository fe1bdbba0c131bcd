#!/usr/bin/env python3
"""Make tests/fixtures/data/eval_distances.json: docarray v1's Euclidean rankings and Finetuner's
metrics of them, on the embeddings of eval_case.json (scripts/make_data_fixtures.py).

    target/peer-venv/bin/python scripts/make_distance_fixture.py     # docarray 0.21.1, numpy

For each of `euclidean` and `sqeuclidean`, as Finetuner's EvaluationCallback(distance=...) ran
them: the queries matched against the index with docarray's `DocumentArray.match(metric=...)`
on float64 embeddings, then `evaluate` in label mode (as eval_case.json's cosine case). Written:
the mean metrics, each query's match ids and distances, and the smallest gap between adjacent
distances in each query's top limit + 1 (near-ties would make the order depend on rounding).
Deterministic: rewriting gives the same bytes.
"""

import inspect
import json
import warnings
from collections import defaultdict
from pathlib import Path

import docarray
import numpy as np
from docarray import Document, DocumentArray
from docarray.math import evaluation as da_eval

# docarray 0.21's metrics call np.asfarray, which NumPy 2 removed: the same function back, for
# a venv with NumPy 2 (the committed file was made so; NumPy 1.26 needs no shim).
if not hasattr(np, "asfarray"):
    np.asfarray = lambda a, dtype=np.float64: np.asarray(a, dtype=dtype)

ROOT = Path(__file__).resolve().parent.parent
CASE = ROOT / "tests" / "fixtures" / "data" / "eval_case.json"
OUT = ROOT / "tests" / "fixtures" / "data" / "eval_distances.json"
METRICS = [n for n, f in inspect.getmembers(da_eval, inspect.isfunction)
           if not n.startswith("_") and f.__module__ == da_eval.__name__]


def docs(items):
    return DocumentArray(Document(id=it["id"], embedding=np.asarray(it["embedding"], dtype=np.float64),
                                  tags={"finetuner_label": it["label"]}) for it in items)


def evaluate(case, metric):
    queries, index = docs(case["queries"]), docs(case["index"])
    groups = defaultdict(list)
    for d in index:
        groups[d.tags["finetuner_label"]].append(d.id)
    truth = DocumentArray(Document(id=d.id, matches=DocumentArray(Document(id=m) for m in groups[d.tags["finetuner_label"]]))
                          for d in queries)
    summary = DocumentArray(Document(id=d.id, embedding=d.embedding) for d in queries)
    summary.match(index, limit=case["limit"], metric=metric, num_worker=1, exclude_self=case["exclude_self"])
    means = {}
    for name in METRICS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            means[name] = summary.evaluate(ground_truth=truth, metrics=[getattr(da_eval, name)], metric_names=[name])[name]
    q = np.stack([d.embedding for d in queries])
    x = np.stack([d.embedding for d in index])
    sq = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    dist = np.sqrt(sq) if metric == "euclidean" else sq
    gap = min(float(np.diff(np.sort(row)[: case["limit"] + 1]).min()) for row in dist)
    per_query = [{"id": d.id, "match_ids": [m.id for m in d.matches],
                  "distances": [float(m.scores[metric].value) for m in d.matches]} for d in summary]
    return {"metrics": means, "per_query": per_query, "min_gap": gap}


def main():
    case = json.loads(CASE.read_text())
    out = {
        "generator": {"script": "scripts/make_distance_fixture.py", "docarray": docarray.__version__,
                      "numpy": np.__version__, "embeddings": "eval_case.json (its queries, index, limit, exclude_self)"},
        "limit": case["limit"],
        "exclude_self": case["exclude_self"],
        "distances": {m: evaluate(case, m) for m in ("euclidean", "sqeuclidean")},
    }
    OUT.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    for m, r in out["distances"].items():
        print(m, {k: round(v, 4) for k, v in r["metrics"].items()}, "min gap", r["min_gap"])


if __name__ == "__main__":
    main()
