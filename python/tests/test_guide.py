"""The "Text-to-Image Search via CLIP" guide's code, written from the guide, on the repository's
demo data: in this process and against a `clipft trainer`; embeddings equal the CLI's."""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from docarray import Document, DocumentArray

import clipft as finetuner
from clipft.callback import BestModelCheckpoint, EvaluationCallback

from conftest import BIN, DEMO, REPO, TINY, demo_rows

METRICS = {"average_precision", "dcg_at_k", "f1_score_at_k", "hit_at_k", "ndcg_at_k",
           "precision_at_k", "r_precision", "recall_at_k", "reciprocal_rank"}


def pairs(name, limit=None):
    """Parent Documents with a text chunk and an image chunk, as the guide builds them; the
    image kinds vary (blob, uri, tensor) so every kind travels."""
    da = DocumentArray()
    for i, (caption, path) in enumerate(demo_rows(name)[:limit]):
        full = os.path.join(DEMO, path)
        image = Document(uri=full, modality="image")
        if i % 3 == 0:
            image.load_uri_to_blob()
        elif i % 3 == 1:
            image.load_uri_to_image_tensor()
            image.uri = ""
        da.append(Document(chunks=[Document(text=caption, modality="text"), image]))
    return da


def eval_callback():
    query = DocumentArray(Document(text=t, tags={"finetuner_label": l}) for t, l in demo_rows("query.csv"))
    index = DocumentArray(Document(uri=os.path.join(DEMO, p), tags={"finetuner_label": l})
                          for p, l in demo_rows("index.csv"))
    return EvaluationCallback(query_data=query, index_data=index, model="clip-text", index_model="clip-vision",
                              gather_examples=True, num_example_queries=3)


def run_guide(run_name):
    """The guide from fit to encode; returns (run, artifact path)."""
    run = finetuner.fit(
        model=TINY,
        run_name=run_name,
        train_data=pairs("train.csv"),
        eval_data=pairs("eval.csv"),
        epochs=2,
        learning_rate=1e-4,
        loss="CLIPLoss",
        cpu=False,
        callbacks=[eval_callback(), BestModelCheckpoint(monitor="val_loss")],
    )
    assert run.name == run_name
    # With the trainer free, fit returns once the run started: the guide's run.logs() works.
    assert run.status()["status"] in ("STARTED", "FINISHED")
    assert f"run {run_name} created" in run.logs()
    assert run.config["model"] == TINY

    run = finetuner.get_run(run_name)
    lines = list(run.stream_logs())
    assert any("epoch 2" in l for l in lines), lines
    assert lines[-1].endswith("finished"), lines[-3:]
    assert run.status() == {"status": "FINISHED", "details": "the artifact is ready"}
    assert "finished" in run.logs()

    metrics = run.metrics()
    assert set(metrics["before"]) == METRICS and set(metrics["after"]) == METRICS
    assert all(0.0 <= v <= 1.0 for k, v in metrics["after"].items() if k != "dcg_at_k")
    assert sorted(run.epoch_metrics()) == [1, 2]
    # gather_examples: the first 3 queries with their top 20 matches, named by their uris.
    examples = run.example_results()
    queries = [t for t, _ in demo_rows("query.csv")[:3]]
    assert [list(examples[stage]) for stage in ("before", "after")] == [queries, queries]
    for matches in list(examples["before"].values()) + list(examples["after"].values()):
        assert len(matches) == 20
        assert all(m.startswith(os.path.join(DEMO, "images")) for m in matches), matches
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        run.display_examples(k=2)
    assert shown.getvalue().count("Match 2 ") == 6 and "Match 3 " not in shown.getvalue()

    artifact = run.save_artifact("clip-model")
    assert artifact == os.path.join("clip-model", f"{run_name}.zip")
    assert os.path.isfile(artifact)
    return run, artifact


def encode_both(artifact):
    text_model = finetuner.get_model(artifact=artifact, select_model="clip-text")
    vision_model = finetuner.get_model(artifact=artifact, select_model="clip-vision")
    test_da = DocumentArray(Document(text=t) for t, _ in demo_rows("query.csv")[:6])
    out = finetuner.encode(model=text_model, data=test_da)
    assert out is test_da
    assert test_da.embeddings.shape == (6, text_model.output_dim)
    assert test_da.embeddings.dtype == np.float32
    return text_model, vision_model, test_da


def test_the_guide_in_process(registry):
    run, artifact = run_guide("clip-fashion")
    text_model, vision_model, test_da = encode_both(artifact)
    # The run is in the registry's folder, where a later session finds it.
    assert (registry / "runs" / "clip-fashion" / "run.json").is_file()
    assert [r.name for r in finetuner.list_runs()] == ["clip-fashion"]

    # Images as uri, blob and tensor give the same embedding.
    path = os.path.join(DEMO, demo_rows("index.csv")[0][0])
    by_uri = Document(uri=path)
    by_blob = Document(uri=path).load_uri_to_blob()
    by_tensor = Document(uri=path).load_uri_to_image_tensor()
    images = DocumentArray([by_uri, by_blob, by_tensor])
    finetuner.encode(vision_model, images, batch_size=2)
    np.testing.assert_allclose(images.embeddings[0], images.embeddings[1], rtol=0, atol=0)
    np.testing.assert_allclose(images.embeddings[0], images.embeddings[2], rtol=0, atol=1e-6)

    # A list of str gives an ndarray, in the DocumentArray's numbers.
    arr = finetuner.encode(text_model, [d.text for d in test_da], batch_size=4)
    assert isinstance(arr, np.ndarray)
    np.testing.assert_allclose(arr, test_da.embeddings, rtol=0, atol=1e-6)


def test_the_guide_against_a_trainer(trainer):
    finetuner.login(trainer=trainer.address, token=trainer.token)
    assert finetuner.get_token() == trainer.token
    # The trainer takes CSV paths and pushed dataset names as well as DocumentArrays.
    run = finetuner.fit(model=TINY, run_name="on-trainer", train_data=os.path.join(DEMO, "train.csv"),
                        eval_data=os.path.join(DEMO, "eval.csv"), epochs=1, learning_rate=1e-4,
                        callbacks=[eval_callback()])
    assert run.config["train_data"] == "on-trainer-train"
    assert [l for l in run.stream_logs()][-1].endswith("finished")
    run, artifact = run_guide("clip-fashion")
    encode_both(artifact)
    assert {r.name for r in finetuner.list_runs()} == {"on-trainer", "clip-fashion"}
    finetuner.delete_run("on-trainer")
    assert [r.name for r in finetuner.list_runs()] == ["clip-fashion"]


def cli_embeddings(args):
    out = subprocess.run([BIN, "encode", *args], capture_output=True, text=True, check=True)
    return np.array([json.loads(l)["embedding"] for l in out.stdout.splitlines()], dtype=np.float32)


def test_embeddings_equal_the_cli(registry):
    run = finetuner.fit(model=TINY, train_data=os.path.join(DEMO, "train.csv"), epochs=1,
                        learning_rate=1e-4, run_name="cli-parity")
    list(run.stream_logs())
    artifact = run.save_artifact("out")
    texts = [t for t, _ in demo_rows("query.csv")[:5]]
    images = [os.path.join(DEMO, p) for p, _ in demo_rows("index.csv")[:5]]
    ours_t = finetuner.encode(finetuner.get_model(artifact, select_model="clip-text"), texts)
    ours_i = finetuner.encode(finetuner.get_model(artifact, select_model="clip-vision"), images)
    cli_t = cli_embeddings(["--artifact", artifact, "--select-model", "clip-text",
                            *[a for t in texts for a in ("--text", t)]])
    cli_i = cli_embeddings(["--artifact", artifact, "--select-model", "clip-vision",
                            *[a for p in images for a in ("--image", p)]])
    np.testing.assert_array_equal(ours_t, cli_t)
    np.testing.assert_array_equal(ours_i, cli_i)
    # A finished run's artifact_id loads the same model (Finetuner's get_model(run.artifact_id)).
    by_id = finetuner.encode(finetuner.get_model(run.artifact_id, select_model="clip-text"), texts)
    np.testing.assert_array_equal(by_id, ours_t)
    # The pre-trained backbone (build_model) is not the fine-tuned one.
    base = finetuner.encode(finetuner.build_model(TINY, select_model="clip-text"), texts)
    assert np.abs(base - ours_t).max() > 1e-4


def test_the_example_script_runs(tmp_path):
    env = dict(os.environ, CLIPFT_DATA_DIR=str(tmp_path / "registry"), CLIPFT_EPOCHS="1")
    env.pop("CLIPFT_TRAINER", None)
    out = subprocess.run([sys.executable, os.path.join(REPO, "examples", "text_to_image.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FINISHED" in out.stdout and "reciprocal_rank" in out.stdout
    assert (tmp_path / "clip-model" / "clip-fashion.zip").is_file()


def test_finetuner_artifacts_load(registry):
    """An artifact Finetuner itself wrote (model.pt state dicts) loads; its backbone's config
    and tokenizer come from `backbone` (the metadata names a hub model this offline test
    cannot fetch). The numbers are the CLI's."""
    art = os.path.join(REPO, "tests", "fixtures", "finetuner-artifact")
    texts = ["a red striped dress", "a hat"]
    image = os.path.join(REPO, "tests", "fixtures", "reference", "images", "rgb_300x200.png")
    ours_t = finetuner.encode(finetuner.get_model(art, select_model="clip-text", backbone=TINY), texts)
    ours_i = finetuner.encode(finetuner.get_model(art, select_model="clip-vision", backbone=TINY), [image])
    cli_t = cli_embeddings(["--model", TINY, "--artifact", art, "--select-model", "clip-text",
                            "--text", texts[0], "--text", texts[1]])
    cli_i = cli_embeddings(["--model", TINY, "--artifact", art, "--select-model", "clip-vision",
                            "--image", image])
    np.testing.assert_array_equal(ours_t, cli_t)
    np.testing.assert_array_equal(ours_i, cli_i)
