"""Runs across sessions, interruption, and the error cases."""

import os
import signal
import textwrap
import time

import pytest
from docarray import Document, DocumentArray

import clipft as finetuner
from clipft.callback import EvaluationCallback

from conftest import DEMO, TINY, run_python

TRAIN = os.path.join(DEMO, "train.csv")


def test_a_local_run_is_found_from_a_fresh_interpreter(tmp_path):
    env = {"CLIPFT_DATA_DIR": str(tmp_path / "registry"), "CLIPFT_TRAINER": ""}
    first = run_python(textwrap.dedent(f"""
        import clipft as finetuner
        run = finetuner.fit(model={TINY!r}, train_data={TRAIN!r}, epochs=1, learning_rate=1e-4,
                            run_name="kept")
        for line in run.stream_logs():
            pass
        print(run.status()["status"])
    """), env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "FINISHED"
    second = run_python(textwrap.dedent(f"""
        import clipft as finetuner
        run = finetuner.get_run("kept")
        print(run.status()["status"], run.config["epochs"])
        print(run.save_artifact({str(tmp_path / 'arts')!r}))
    """), env)
    assert second.returncode == 0, second.stderr
    status, path = second.stdout.strip().splitlines()
    assert status == "FINISHED 1"
    assert os.path.isfile(path)


def test_an_interrupted_local_run_resumes_in_the_next_session(tmp_path):
    env = {"CLIPFT_DATA_DIR": str(tmp_path / "registry"), "CLIPFT_TRAINER": ""}
    # The interpreter ends while the run trains: at exit the run writes a checkpoint.
    first = run_python(textwrap.dedent(f"""
        import clipft as finetuner
        run = finetuner.fit(model={TINY!r}, train_data={TRAIN!r}, epochs=40, learning_rate=1e-4,
                            run_name="long")
        for line in run.stream_logs():
            if " step " in line:
                break
        print(run.status()["status"])
    """), env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "STARTED"
    second = run_python(textwrap.dedent("""
        import clipft as finetuner
        run = finetuner.get_run("long")
        lines = []
        for line in run.stream_logs():
            lines.append(line)
            if "epoch 3:" in line:
                break
        text = "\\n".join(lines)
        print("suspended at step" in text, "resuming" in text)
        run.cancel()
    """), env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["True", "True"]


def test_ctrl_c_stops_stream_logs_not_the_run(tmp_path):
    out = run_python(textwrap.dedent(f"""
        import os, signal, threading
        import clipft as finetuner
        # A shell that starts jobs in the background without job control (`.ci/run &`)
        # starts them with SIGINT ignored, and Python then installs no Ctrl-C handler: the
        # kill below would be lost and the loop would follow the run to its end. A user at a
        # terminal has the handler; so does this test.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # Steps enough that the run is still going when Ctrl-C comes, however fast the machine
        # (40 epochs of the default batch took under 2 s on an idle one).
        run = finetuner.fit(model={TINY!r}, train_data={TRAIN!r}, epochs=49, batch_size=2,
                            learning_rate=1e-4, run_name="watched")
        threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            for line in run.stream_logs():
                pass
            print("ended")
        except KeyboardInterrupt:
            print("interrupted", run.status()["status"])
        run.cancel()
    """), {"CLIPFT_DATA_DIR": str(tmp_path / "registry"), "CLIPFT_TRAINER": ""})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "interrupted STARTED"
    assert "goes on" in out.stderr


def test_unsupported_settings_are_refused_before_anything_runs(registry):
    for kwargs, words in [
        ({"loss": "TripletMarginLoss"}, "CLIPLoss"),
        ({"optimizer": "SGD"}, "Adam"),
        ({"device": "tpu"}, "device"),
        ({"scheduler": "polynomial"}, "scheduler"),
        ({"optimizer_options": {"layer_wise_lr_decay": 1.5}}, "layer_wise_lr_decay"),
        ({"optimizer_options": {"momentum": 0.9}}, "momentum"),
        ({"epochs": 0}, "epochs"),
        ({"sampler": "class"}, "random"),
        ({"callbacks": [EvaluationCallback(query_data="q", distance="manhattan")]}, "cosine"),
    ]:
        with pytest.raises(ValueError, match=words):
            finetuner.fit(model=TINY, train_data=TRAIN, run_name="refused", **kwargs)
    if finetuner._native.device_problem("cuda:0"):  # a CPU build, as in CI
        with pytest.raises(ValueError, match="cuda"):
            finetuner.fit(model=TINY, train_data=TRAIN, run_name="refused", device="cuda:0")
    with pytest.raises(ValueError, match="open-clip"):
        finetuner.fit(model="ViT-B-32::laion2b_s34b_b79k", train_data=TRAIN)
    with pytest.raises(ValueError, match="neither a file nor a dataset"):
        finetuner.fit(model=TINY, train_data="no-such-dataset")
    with pytest.raises(ValueError, match="chunk|image|text"):
        finetuner.fit(model=TINY, train_data=DocumentArray([Document(text="only text")]), run_name="bad-data")
    assert finetuner.list_runs() == []
    import json
    assert json.loads(finetuner._get_session().list_datasets()) == []


def test_the_model_and_callback_listings(registry, capsys):
    names = finetuner.list_models()
    assert "openai/clip-vit-base-patch32" in names
    # Finetuner's shape: each backbone's options; CLIP backbones take none, and fit refuses any.
    assert finetuner.list_model_options() == {name: [] for name in names}
    finetuner.describe_models(task="text-to-image")
    printed = capsys.readouterr().out
    assert "openai/clip-vit-base-patch32" in printed and "512" in printed
    finetuner.describe_models(task="image-to-image")
    assert "openai/clip-vit-base-patch32" not in capsys.readouterr().out
    assert set(finetuner.list_callbacks()) == {
        "EvaluationCallback", "BestModelCheckpoint", "EarlyStopping", "TrainingCheckpoint", "WiSEFTCallback"}
    # Runs train in this process: no token is sent anywhere.
    assert finetuner.get_token() is None


def test_select_model_is_required(registry):
    with pytest.raises(finetuner.SelectModelRequired):
        finetuner.get_model(TINY)
    with pytest.raises(finetuner.NoSuchModel):
        finetuner.get_model(TINY, select_model="clip-audio")
    with pytest.raises(finetuner.SelectModelRequired):
        finetuner.build_model(TINY)
    model = finetuner.build_model(TINY, select_model="clip-text")
    with pytest.raises(ValueError, match="no text"):
        finetuner.encode(model, DocumentArray([Document(uri=os.path.join(DEMO, "images", "x.png"))]))
    with pytest.raises(TypeError):
        finetuner.encode(model, "a plain string")


def test_unfinished_runs_have_no_artifact_and_queued_runs_no_logs(registry):
    first = finetuner.fit(model=TINY, train_data=TRAIN, epochs=40, learning_rate=1e-4, run_name="first")
    queued = finetuner.fit(model=TINY, train_data=TRAIN, epochs=1, learning_rate=1e-4, run_name="queued")
    # One run trains at a time: the second waits.
    assert queued.status()["status"] == "CREATED"
    with pytest.raises(finetuner.RunPreparingError):
        queued.logs()
    with pytest.raises(finetuner.RunInProgressError):
        queued.save_artifact()
    with pytest.raises(finetuner.RunInProgressError):
        first.save_artifact()
    with pytest.raises(finetuner.AlreadyExistsError):
        finetuner.fit(model=TINY, train_data=TRAIN, run_name="first")
    queued.cancel()
    first.cancel()
    for _ in range(600):
        if first.status()["status"] != "STARTED":
            break
        time.sleep(0.1)
    assert first.status()["status"] == "CANCELED"
    with pytest.raises(finetuner.RunFailedError):
        first.save_artifact()
    with pytest.raises(finetuner.NotFoundError):
        finetuner.get_run("never-made")
    finetuner.delete_run("first")
    assert [r.name for r in finetuner.list_runs()] == ["queued"]


def test_a_wrong_token_is_refused(trainer):
    with pytest.raises(finetuner.AuthenticationError, match="token"):
        finetuner.login(trainer=trainer.address, token="wrong")
    with pytest.raises(finetuner.AuthenticationError):
        finetuner.login(trainer=trainer.address)
    finetuner.login(trainer=trainer.address, token=trainer.token)
    assert finetuner.list_runs() == []


def test_a_second_interpreter_shares_a_held_registry(tmp_path, monkeypatch):
    """A registry held by one Python session (a notebook still open) is used by another through
    the first one's trainer; once the first exits, the second takes the registry over."""
    import subprocess
    import sys

    data_dir = tmp_path / "registry"
    monkeypatch.delenv("CLIPFT_TRAINER", raising=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            import clipft as finetuner
            finetuner.login(data_dir={str(data_dir)!r})
            finetuner.fit(model={TINY!r}, train_data={TRAIN!r}, epochs=40, learning_rate=1e-4,
                          run_name="shared")
            print("ready", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        finetuner.login(data_dir=str(data_dir))
        session = finetuner._get_session()
        assert session.holder_pid == holder.pid
        run = finetuner.get_run("shared")
        assert run.status()["status"] in ("CREATED", "STARTED")
        run.cancel()
        for _ in range(600):
            if run.status()["status"] == "CANCELED":
                break
            time.sleep(0.1)
        assert run.status()["status"] == "CANCELED"
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
    # The holder has gone: the next call opens the registry here.
    assert finetuner.get_run("shared").status()["status"] == "CANCELED"
    assert finetuner._get_session().holder_pid == os.getpid()


def _until_ended(run, seconds=300):
    deadline = time.monotonic() + seconds
    while run.status()["status"] in ("CREATED", "STARTED"):
        assert time.monotonic() < deadline, f"run {run.name} did not end"
        time.sleep(0.1)
    return run.status()["status"]


def test_experiments_group_runs(registry):
    assert [x.name for x in finetuner.list_experiments()] == ["default"]
    a = finetuner.create_experiment("exp-a")
    assert (a.name, a.status) == ("exp-a", "ACTIVE")
    assert a.created_at.endswith("Z")
    with pytest.raises(finetuner.AlreadyExistsError):
        finetuner.create_experiment("exp-a")
    with pytest.raises(finetuner.NotFoundError):
        finetuner.get_experiment("nope")
    with pytest.raises(ValueError, match="experiment_name"):
        finetuner.fit(model=TINY, train_data=TRAIN, experiment_name="../up")

    # A run's experiment is created on its first run; runs that name none go to "default".
    long = finetuner.fit(model=TINY, train_data=TRAIN, epochs=40, learning_rate=1e-4,
                         run_name="long", experiment_name="exp-b")
    plain = finetuner.fit(model=TINY, train_data=TRAIN, epochs=1, learning_rate=1e-4, run_name="plain",
                          description="the baseline")
    via = a.create_run(model=TINY, train_data=TRAIN, epochs=1, learning_rate=1e-4, run_name="via-exp")
    assert (long.experiment_name, plain.experiment_name, via.experiment_name) == ("exp-b", "default", "exp-a")
    assert (plain.description, long.description) == ("the baseline", "")
    assert [x.name for x in finetuner.list_experiments()] == ["default", "exp-a", "exp-b"]
    b = finetuner.get_experiment("exp-b")
    assert [r.name for r in b.list_runs()] == ["long"]
    assert [r.name for r in finetuner.list_runs("exp-a")] == ["via-exp"]
    assert len(finetuner.list_runs()) == 3
    # Paged by the trainer, in creation order.
    assert [r.name for r in finetuner.list_runs(page=2, size=1)] == ["plain"]
    assert [r.name for r in finetuner.list_runs(page=2, size=2)] == ["via-exp"]
    assert finetuner.list_runs(page=3, size=2) == []
    with pytest.raises(ValueError, match="page"):
        finetuner.list_runs(page=0)
    assert finetuner.get_run("long", "exp-b").name == "long"
    with pytest.raises(finetuner.NotFoundError, match="exp-b"):
        finetuner.get_run("long", "exp-a")
    with pytest.raises(finetuner.NotFoundError):
        b.get_run("plain")
    with pytest.raises(finetuner.NotFoundError):
        finetuner.delete_run("plain", experiment_name="exp-b")
    # Names are unique across experiments.
    with pytest.raises(finetuner.AlreadyExistsError):
        finetuner.fit(model=TINY, train_data=TRAIN, run_name="long", experiment_name="exp-a")

    # Not while one of its runs trains; then with its runs.
    while long.status()["status"] != "STARTED":
        time.sleep(0.05)
    with pytest.raises(finetuner.TrainerError, match="cancel"):
        finetuner.delete_experiment("exp-b")
    long.cancel()
    assert _until_ended(long) == "CANCELED"
    gone = finetuner.delete_experiment("exp-b")
    assert gone.name == "exp-b"
    with pytest.raises(finetuner.NotFoundError):
        finetuner.get_run("long")
    assert [x.name for x in finetuner.list_experiments()] == ["default", "exp-a"]

    # delete_runs within one experiment leaves the others' runs.
    assert _until_ended(via) == "FINISHED"
    finetuner.delete_runs("exp-a")
    assert [r.name for r in finetuner.list_runs()] == ["plain"]
    assert _until_ended(plain) == "FINISHED"
    deleted = finetuner.delete_experiments()
    assert sorted(x.name for x in deleted) == ["default", "exp-a"]
    assert finetuner.list_runs() == []
    assert [x.name for x in finetuner.list_experiments()] == ["default"]
