"""A Finetuner notebook's own lines, after only its import line changed: `from finetuner...`
imports, `finetuner.DocumentArray`, CSVOptions, open CSV files, Finetuner 0.6's arguments,
model_artifact, val_split, layer_wise_lr_decay."""

import csv
import io
import os
import textwrap
import zipfile

import pytest

import clipft as finetuner
from clipft.data import CSVOptions, rewrite_csv

from conftest import DEMO, TINY, demo_rows, run_python


def test_from_finetuner_imports_work_after_import_clipft_as_finetuner():
    code = textwrap.dedent("""
        import clipft as finetuner
        from finetuner import DocumentArray, Document
        from finetuner.callback import EvaluationCallback, WiSEFTCallback
        from finetuner.data import CSVOptions
        from finetuner.excepts import NotFoundError
        import finetuner.run
        da = DocumentArray([Document(text="a")])
        model = type("M", (), {"select_model": "clip-vision"})()
        uris = finetuner.build_encoding_dataset(model, ["a.png"])
        print(finetuner.__name__, len(da), CSVOptions().dialect, uris[0].uri,
              finetuner.notebook_login is finetuner.login, EvaluationCallback.__module__)
    """)
    done = run_python(code, {"CLIPFT_TRAINER": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["clipft", "1", "auto", "a.png", "True", "clipft.callback"]
    off = run_python("import clipft\nimport finetuner.callback\n", {"CLIPFT_NO_FINETUNER_ALIAS": "1"})
    assert off.returncode != 0 and "No module named 'finetuner'" in off.stderr


def _tsv_beside_cwd(tmp_path):
    """The demo's pairs as a tab-separated file in a subfolder, its image paths relative to
    the current folder (tmp_path) as a Finetuner notebook wrote them."""
    rows = demo_rows("train.csv")
    sub = tmp_path / "sub"
    sub.mkdir()
    path = sub / "train.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, dialect="excel-tab")
        for caption, image in rows:
            w.writerow([caption, os.path.relpath(os.path.join(DEMO, image), tmp_path)])
    return path, len(rows)


def _pairs_trained(run) -> int:
    for _ in run.stream_logs():
        pass
    assert run.status()["status"] == "FINISHED", run.status()
    line = next(l for l in run.logs().splitlines() if " pairs, " in l)
    return int(line.split(" pairs, ")[0].split()[-1])


def test_csv_options_are_honoured(registry, tmp_path):
    path, n = _tsv_beside_cwd(tmp_path)
    common = dict(model=TINY, epochs=1, batch_size=4, learning_rate=1e-4)
    run = finetuner.fit(train_data=str(path), csv_options=CSVOptions(size=10), run_name="tsv",
                        **common)
    assert _pairs_trained(run) == 10
    # Sampling keeps a seeded part of the rows, the same part each time.
    out = [tmp_path / f"s{i}.csv" for i in range(3)]
    kept = [rewrite_csv(str(path), CSVOptions(sampling_rate=0.5), str(o), seed=1) for o in out[:2]]
    assert 0 < kept[0] < n and kept[0] == kept[1]
    assert out[0].read_text() == out[1].read_text()
    # Image paths come out absolute; a named dialect is read as that dialect.
    rewrite_csv(str(path), CSVOptions(dialect="excel-tab", size=2), str(out[2]))
    rows = list(csv.reader(open(out[2])))
    assert len(rows) == 2 and all(os.path.isabs(r[1]) and os.path.isfile(r[1]) for r in rows)
    for bad, words in [(CSVOptions(is_labeled=True), "is_labeled"),
                       (CSVOptions(sampling_rate=0), "sampling_rate"),
                       (CSVOptions(dialect="nope"), "dialect"),
                       ({"size": 3}, "CSVOptions")]:
        with pytest.raises((ValueError, TypeError), match=words):
            finetuner.fit(train_data=str(path), csv_options=bad, run_name="refused", **common)


def test_open_csv_files_and_finetuner_06_arguments(registry, tmp_path):
    rows = demo_rows("train.csv")[:12]
    text = "".join(f"{c},{os.path.relpath(os.path.join(DEMO, i), tmp_path)}\n" for c, i in rows)
    common = dict(model=TINY, epochs=1, batch_size=4, learning_rate=1e-4)
    run = finetuner.fit(train_data=io.StringIO(text), scheduler_step="batch", run_name="opened",
                        **common)
    assert _pairs_trained(run) == 12
    with pytest.raises(ValueError, match="scheduler_step"):
        finetuner.fit(train_data=io.StringIO(text), scheduler_step="epoch", run_name="refused",
                      **common)


def _tensor(path, name):
    """One f32 tensor of a safetensors file (8-byte header length, JSON header, data)."""
    import json
    import struct

    import numpy as np

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        start, end = header[name]["data_offsets"]
        f.seek(8 + n + start)
        return np.frombuffer(f.read(end - start), dtype="<f4").reshape(header[name]["shape"])


def test_model_artifact_continues_from_a_finished_run(registry, tmp_path):
    rows = demo_rows("train.csv")[:16]
    text = "".join(f"{c},{os.path.join(DEMO, i)}\n" for c, i in rows)
    common = dict(model=TINY, epochs=1, batch_size=8, learning_rate=1e-3)
    first = finetuner.fit(train_data=io.StringIO(text), run_name="first", **common)
    list(first.stream_logs())
    assert first.status()["status"] == "FINISHED", first.status()
    # The backbone frozen: what the second run's artifact holds of it is what it started from.
    second = finetuner.fit(train_data=io.StringIO(text), run_name="second", freeze=True,
                           model_artifact=first.artifact_id, **common)
    list(second.stream_logs())
    assert second.status()["status"] == "FINISHED", second.logs()
    assert "model_artifact" in second.logs()
    assert second.config["model_artifact"] == "first"

    def weights(run, name):
        path = registry / "runs" / run / "artifact" / run / "models" / "clip-text" / "model.safetensors"
        return _tensor(path, name)

    frozen = "text_model.encoder.layers.0.mlp.fc1.weight"
    base = _tensor(os.path.join(TINY, "model.safetensors"), frozen)
    assert (weights("second", frozen) == weights("first", frozen)).all()
    assert not (weights("second", frozen) == base).all()
    # A name of no run, or one that is no run name, is refused before anything runs.
    for bad, words in [("nope", "no run of that name"), ("../x", "artifact_id")]:
        with pytest.raises(Exception, match=words):
            finetuner.fit(train_data=io.StringIO(text), run_name="refused", model_artifact=bad,
                          **common)


def test_to_onnx_writes_model_onnx_and_get_model_is_onnx_loads_it(registry, tmp_path):
    rows = demo_rows("train.csv")[:16]
    text = "".join(f"{c},{os.path.join(DEMO, i)}\n" for c, i in rows)
    common = dict(model=TINY, epochs=1, batch_size=8, learning_rate=1e-3)
    run = finetuner.fit(train_data=io.StringIO(text), run_name="with-onnx", to_onnx=True, **common)
    list(run.stream_logs())
    assert run.status()["status"] == "FINISHED", run.logs()
    assert run.config["to_onnx"] is True
    zip_path = run.save_artifact(str(tmp_path))
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
    for sub in ("clip-text", "clip-vision"):
        assert f"with-onnx/models/{sub}/model.onnx" in names, names
        assert f"with-onnx/models/{sub}/model.safetensors" in names, names
    # is_onnx=True loads the submodel that has a graph; clipft computes with the weights beside
    # it (the graph's own numbers are checked against these in ONNX Runtime by tests/onnx.rs).
    onnx_model = finetuner.get_model(zip_path, select_model="clip-text", is_onnx=True, device="cpu")
    plain = finetuner.get_model(zip_path, select_model="clip-text", device="cpu")
    texts = ["a red dress", "blue jeans"]
    assert (finetuner.encode(onnx_model, texts) == finetuner.encode(plain, texts)).all()
    # A run without to_onnx has no ONNX model to load, as with Finetuner.
    plain_run = finetuner.fit(train_data=io.StringIO(text), run_name="no-onnx", **common)
    list(plain_run.stream_logs())
    assert "to_onnx" not in plain_run.config
    plain_zip = plain_run.save_artifact(str(tmp_path))
    with pytest.raises(ValueError, match="to_onnx=True"):
        finetuner.get_model(plain_zip, select_model="clip-vision", is_onnx=True, device="cpu")
    with pytest.raises(TypeError, match="to_onnx"):
        finetuner.fit(train_data=io.StringIO(text), run_name="refused", to_onnx="yes", **common)


def test_val_split_and_layer_wise_lr_decay(registry):
    rows = demo_rows("train.csv")[:16]
    text = "".join(f"{c},{os.path.join(DEMO, i)}\n" for c, i in rows)
    from clipft.callback import EarlyStopping

    run = finetuner.fit(model=TINY, train_data=io.StringIO(text), val_split=0.25, epochs=2,
                        batch_size=4, learning_rate=1e-4, run_name="split",
                        optimizer_options={"layer_wise_lr_decay": 0.98, "weight_decay": 0.01},
                        callbacks=[EarlyStopping(monitor="val_loss", patience=5)])
    assert _pairs_trained(run) == 12
    assert "4 of the training pairs held out" in run.logs()
    assert "layer-wise learning-rate decay 0.98" in run.logs()
    assert run.config["val_split"] == 0.25
    assert run.config["layer_wise_lr_decay"] == 0.98
    for bad in (1.0, -0.1, "0.2", True):
        with pytest.raises(ValueError, match="val_split"):
            finetuner.fit(model=TINY, train_data=io.StringIO(text), val_split=bad, run_name="x")


def test_evaluation_callback_samples_queries_and_takes_distances(registry):
    from clipft.callback import EvaluationCallback

    rows = demo_rows("train.csv")[:16]
    text = "".join(f"{c},{os.path.join(DEMO, i)}\n" for c, i in rows)
    queries = [t for t, _ in demo_rows("query.csv")]
    cb = lambda **kw: EvaluationCallback(  # noqa: E731
        query_data=os.path.join(DEMO, "query.csv"), index_data=os.path.join(DEMO, "index.csv"),
        model="clip-text", index_model="clip-vision", multi_modal=True, **kw)
    run = finetuner.fit(model=TINY, train_data=io.StringIO(text), epochs=1, batch_size=8,
                        learning_rate=1e-4, run_name="sampled",
                        callbacks=[cb(query_sample_size=5, gather_examples=True,
                                      num_example_queries=50, distance="euclidean")])
    _pairs_trained(run)
    assert run.config["distance"] == "euclidean"
    assert set(run.metrics()["after"]) and all(0 <= v for v in run.metrics()["after"].values())
    assert f"query_sample_size 5: 5 of the {len(queries)} queries" in run.logs()
    examples = run.example_results()
    assert len(examples["before"]) == 5 and list(examples["before"]) == list(examples["after"])
    assert set(examples["before"]) <= set(queries)
    for kw, words in [({"steps_per_interval": 10}, "steps_per_interval"),
                      ({"caption": "mine"}, "caption"),
                      ({"output_model_names": True}, "output_model_names"),
                      ({"query_sample_size": 0}, "query_sample_size")]:
        with pytest.raises(ValueError, match=words):
            finetuner.fit(model=TINY, train_data=io.StringIO(text), run_name="x", callbacks=[cb(**kw)])
