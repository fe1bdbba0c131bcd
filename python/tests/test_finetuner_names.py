"""A Finetuner notebook's own lines, after only its import line changed: `from finetuner...`
imports, `finetuner.DocumentArray`, CSVOptions, open CSV files, Finetuner 0.6's arguments."""

import csv
import io
import os
import textwrap

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
