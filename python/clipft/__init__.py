"""clipft: Finetuner's Python API for CLIP, on clipft's Rust core.

A Finetuner notebook runs with one changed line, ``import clipft as finetuner``:

>>> import clipft as finetuner
>>> finetuner.login()                      # runs train in this process
>>> run = finetuner.fit(model='openai/clip-vit-base-patch32', train_data=train_da,
...                     epochs=5, learning_rate=1e-5, loss='CLIPLoss')
>>> for line in run.stream_logs(): print(line)
>>> artifact = run.save_artifact('clip-model')
>>> model = finetuner.get_model(artifact, select_model='clip-text')
>>> finetuner.encode(model, test_da)       # fills test_da.embeddings

Where runs go: ``login(trainer='grpc://host:8081', token=...)`` (or ``CLIPFT_TRAINER`` /
``CLIPFT_AUTH_TOKEN``) sends them to a ``clipft trainer``; otherwise they train in this process,
in the background, on the same trainer code, with their records in a run registry under the
user's data folder (``CLIPFT_DATA_DIR`` or ``login(data_dir=...)``), so ``get_run`` finds them
after Python restarts and an interrupted run resumes from its last checkpoint.
"""

import atexit
import json
import os
import sys
import tempfile
import time
import zipfile
from typing import Any, Dict, List, Optional, Sequence, Union

from . import _native
from ._data import image_item, is_documents, text_item, write_docarray
from .callback import (
    BestModelCheckpoint,
    EarlyStopping,
    EvaluationCallback,
    TrainingCheckpoint,
    WandBLogger,
    WiSEFTCallback,
)
from .exception import (
    AlreadyExistsError,
    AuthenticationError,
    ClipftError,
    FinetunerServerError,
    NoSuchModel,
    NotFoundError,
    RunFailedError,
    RunInProgressError,
    RunPreparingError,
    SelectModelRequired,
    TrainerError,
    UserNotLoggedInError,
)
from . import callback, data, exception, experiment, run
from .data import CSVOptions, build_encoding_dataset
from .experiment import Experiment, _check_page, _delete_unstarted, _page
from .run import Run

__version__ = _native.core_version()

_session = None  # where runs go now
_local = None  # the in-process trainer, once started (kept while Python runs)
_token = None  # the bearer token of the trainer runs go to (login's, else CLIPFT_AUTH_TOKEN)

CLIP_MODELS = ("clip-text", "clip-vision")

#: The experiment of runs that name none (Finetuner 0.8's default).
DEFAULT_EXPERIMENT = "default"


def _default_data_dir() -> str:
    env = os.environ.get("CLIPFT_DATA_DIR")
    if env:
        return env
    if sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Application Support")
    else:
        base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "clipft")


def _holds_registry(session) -> bool:
    return session is not None and session.holder_pid == os.getpid()


def _holder_alive(session) -> bool:
    """Whether the Python process serving a shared local registry still runs."""
    try:
        os.kill(session.holder_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shutdown() -> None:
    """At exit: running local runs write a checkpoint and resume in the next session."""
    global _local
    if _local is None or not _holds_registry(_local):
        return
    try:
        unfinished = [r["name"] for r in json.loads(_local.list_runs())
                      if r["status"] in ("CREATED", "STARTED")]
    except Exception:  # the registry is going away either way
        unfinished = []
    try:
        timeout = float(os.environ.get("CLIPFT_SHUTDOWN_TIMEOUT", "60"))
    except ValueError:
        timeout = 60.0
    _local.shutdown(timeout)
    if unfinished:
        print(
            f"clipft: unfinished runs ({', '.join(unfinished)}) stopped at a checkpoint; they "
            f"resume the next time Python uses the registry {_local.data_dir}",
            file=sys.stderr,
        )
    _local = None


atexit.register(_shutdown)


def login(
    token: Optional[str] = None,
    trainer: Optional[str] = None,
    force: bool = False,
    interactive: Optional[bool] = None,
    data_dir: Optional[str] = None,
    tls_ca: Optional[str] = None,
) -> None:
    """Chooses where runs go.

    :param token: the trainer's bearer token (its ``--auth-token``); default ``CLIPFT_AUTH_TOKEN``.
    :param trainer: a ``clipft trainer`` address (``grpc://host:8081``, ``grpcs://`` for TLS);
        default ``CLIPFT_TRAINER``. Without one, runs train in this process.
    :param force, interactive: accepted for Finetuner code; there is no browser login.
    :param data_dir: the local run registry (default ``CLIPFT_DATA_DIR``, else the user's data
        folder, ``~/.local/share/clipft`` on Linux).
    :param tls_ca: a CA certificate to trust for a ``grpcs://`` trainer (``CLIPFT_TLS_CA``).
    """
    global _session, _local, _token
    trainer = trainer or os.environ.get("CLIPFT_TRAINER") or None
    token = token or os.environ.get("CLIPFT_AUTH_TOKEN") or None
    _token = token if trainer else None
    if trainer:
        ca = tls_ca or os.environ.get("CLIPFT_TLS_CA") or None
        _session = _native.Session.remote(trainer, token, ca)
        print(f"clipft: runs go to the trainer at {trainer}", file=sys.stderr)
        return
    wanted = os.path.abspath(data_dir or _default_data_dir())
    if _local is not None and (
        os.path.abspath(_local.data_dir) != wanted
        or (not _holds_registry(_local) and not _holder_alive(_local))
    ):
        # One registry per process: runs of the old one stop at a checkpoint and resume when
        # that registry is opened again.
        _local.shutdown(60.0)
        _local = None
    if _local is None:
        _local = _native.Session.local(
            wanted,
            device="auto",
            checkpoint_seconds=int(os.environ.get("CLIPFT_CHECKPOINT_SECONDS", "300")),
            max_queued=int(os.environ.get("CLIPFT_MAX_QUEUED_RUNS", "100")),
            max_experiments=int(os.environ.get("CLIPFT_MAX_EXPERIMENTS", "1000")),
            max_batch_size=int(os.environ.get("CLIPFT_MAX_BATCH_SIZE", "1024")),
            max_interruptions=int(os.environ.get("CLIPFT_MAX_INTERRUPTIONS", "3")),
        )
    _session = _local
    if _holds_registry(_local):
        print(f"clipft: runs train in this process; records in {wanted}", file=sys.stderr)
    else:
        # Another interpreter (a second notebook) holds the registry: runs go to its trainer
        # and train there, until it exits.
        print(
            f"clipft: the registry {wanted} is held by Python process {_local.holder_pid}; "
            "runs go to it and train there while it runs",
            file=sys.stderr,
        )


def get_token() -> Optional[str]:
    """The bearer token sent to the trainer (``login(token=...)`` or ``CLIPFT_AUTH_TOKEN``);
    None when runs train in this process, which needs none. Before ``login`` it is the token
    that ``login()`` would take, without logging in."""
    if _session is None:
        return (os.environ.get("CLIPFT_AUTH_TOKEN") or None) if os.environ.get("CLIPFT_TRAINER") else None
    return _token


def _get_session():
    if _session is None:
        login()
    elif _session is _local and not _holds_registry(_local) and not _holder_alive(_local):
        # The interpreter that held the local registry has gone: this one takes it over (its
        # unfinished runs resume here).
        login(data_dir=_local.data_dir)
    return _session


# ---------------------------------------------------------------------------------------------
# fit


def _device(device: Optional[str], cpu: Optional[bool]) -> str:
    """Finetuner's ``device`` / ``cpu`` as the trainer's device. ``cuda`` (and ``cpu=False``)
    asked Finetuner's cloud for a GPU; here they mean the GPU where there is one."""
    if device is not None:
        if device in ("cpu", "auto") or device.startswith("cuda:"):
            return device
        if device in ("cuda", "gpu"):
            return "auto"
        raise ValueError(f"device {device!r} is not supported: use 'cuda', 'cuda:N', 'cpu' or 'auto'")
    if cpu is not None:
        return "cpu" if cpu else "auto"
    return "auto"


def _refuse(what: str, value: Any, why: str) -> None:
    if value not in (None, False, {}, [], 0, 0.0):
        raise ValueError(f"{what}={value!r} is not supported: {why}")


def _hyper_parameters(
    optimizer: str,
    optimizer_options: Optional[Dict[str, Any]],
    learning_rate: Optional[float],
    scheduler: Optional[str],
    scheduler_options: Optional[Dict[str, Any]],
) -> Dict[str, Any]:
    names = {"adam": "Adam", "adamw": "AdamW"}
    if not isinstance(optimizer, str) or optimizer.lower() not in names:
        raise ValueError(f"optimizer {optimizer!r} is not supported: use 'Adam' or 'AdamW'")
    cfg: Dict[str, Any] = {"optimizer": names[optimizer.lower()]}
    opts = dict(optimizer_options or {})
    wd = opts.pop("weight_decay", 0.0)
    if not isinstance(wd, (int, float)) or wd < 0:
        raise ValueError(f"optimizer_options weight_decay must be a number >= 0, got {wd!r}")
    cfg["weight_decay"] = float(wd)
    llrd = opts.pop("layer_wise_lr_decay", None)
    if llrd is not None:
        if isinstance(llrd, bool) or not isinstance(llrd, (int, float)) or not 0 < llrd <= 1:
            raise ValueError(
                f"optimizer_options layer_wise_lr_decay must be a number in (0, 1], got {llrd!r}"
            )
        cfg["layer_wise_lr_decay"] = float(llrd)
    if opts:
        raise ValueError(
            f"optimizer_options {sorted(opts)} are not supported (weight_decay and "
            "layer_wise_lr_decay are)"
        )
    # Finetuner: without a learning rate the optimiser's own default applies (torch's Adam and
    # AdamW: 1e-3).
    lr = 1e-3 if learning_rate is None else learning_rate
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
    cfg["learning_rate"] = float(lr)
    schedulers = {None: "constant", "constant": "constant", "constant_with_warmup": "constant",
                  "linear": "linear", "cosine": "cosine"}
    if scheduler not in schedulers:
        raise ValueError(
            f"scheduler {scheduler!r} is not supported: use None, 'constant', "
            "'constant_with_warmup', 'linear' or 'cosine'"
        )
    cfg["scheduler"] = schedulers[scheduler]
    sopts = dict(scheduler_options or {})
    warmup = sopts.pop("num_warmup_steps", 0)
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"scheduler_options num_warmup_steps must be an int >= 0, got {warmup!r}")
    cfg["warmup_steps"] = warmup
    if sopts.pop("num_training_steps", "auto") != "auto":
        raise ValueError("scheduler_options num_training_steps: only 'auto' (the whole run) is supported")
    if sopts.pop("scheduler_step", "batch") != "batch":
        raise ValueError("scheduler_options scheduler_step: only 'batch' is supported")
    if sopts:
        raise ValueError(f"scheduler_options {sorted(sopts)} are not supported")
    return cfg


def _callbacks(callbacks: Optional[Sequence[Any]]) -> Dict[str, Any]:
    """The callbacks as run settings; the data of an EvaluationCallback is returned under
    ``query_data`` / ``index_data`` for pushing."""
    out: Dict[str, Any] = {"eval_every": 1}
    seen = set()
    for cb in callbacks or []:
        kind = type(cb).__name__
        if kind in seen:
            raise ValueError(f"callbacks: {kind} given twice")
        seen.add(kind)
        if isinstance(cb, EvaluationCallback):
            if cb.distance not in ("cosine", "euclidean", "sqeuclidean"):
                raise ValueError(
                    f"EvaluationCallback distance {cb.distance!r}: use 'cosine', 'euclidean' or 'sqeuclidean'"
                )
            if cb.distance != "cosine":
                out["distance"] = cb.distance
            for attr, want in (("model", "clip-text"), ("index_model", "clip-vision")):
                got = getattr(cb, attr)
                if got not in (None, want):
                    raise ValueError(
                        f"EvaluationCallback {attr}={got!r}: clipft evaluates text queries "
                        "(clip-text) against an image index (clip-vision)"
                    )
            if not isinstance(cb.limit, int) or cb.limit < 1:
                raise ValueError(f"EvaluationCallback limit must be a positive int, got {cb.limit!r}")
            _refuse("EvaluationCallback steps_per_interval", cb.steps_per_interval,
                    "metrics are measured at epoch ends")
            _refuse("EvaluationCallback caption", cb.caption, "metrics are named as docarray names them")
            _refuse("EvaluationCallback output_model_names", cb.output_model_names,
                    "metrics are named as docarray names them")
            n = cb.query_sample_size
            if n is not None:
                if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                    raise ValueError(
                        f"EvaluationCallback query_sample_size must be a positive int, got {n!r}"
                    )
                out["query_sample_size"] = n
            out["query_data"] = cb.query_data
            out["index_data"] = cb.index_data if cb.index_data is not None else cb.query_data
            out["limit"] = cb.limit
            if cb.gather_examples:
                if not isinstance(cb.num_example_queries, int) or cb.num_example_queries < 1:
                    raise ValueError(
                        f"EvaluationCallback num_example_queries must be a positive int, got {cb.num_example_queries!r}"
                    )
                out["example_queries"] = cb.num_example_queries
        elif isinstance(cb, BestModelCheckpoint):
            out["best_model"] = {"name": cb.monitor, "mode": _mode(cb.mode)}
        elif isinstance(cb, EarlyStopping):
            if not isinstance(cb.patience, int) or cb.patience < 1:
                raise ValueError(f"EarlyStopping patience must be an int >= 1, got {cb.patience!r}")
            out["early_stopping"] = {
                "monitor": {"name": cb.monitor, "mode": _mode(cb.mode)},
                "patience": cb.patience,
                "min_delta": float(cb.min_delta),
                "baseline": cb.baseline,
            }
        elif isinstance(cb, TrainingCheckpoint):
            if cb.checkpoint_seconds is not None:
                out["checkpoint_seconds"] = int(cb.checkpoint_seconds)
        elif isinstance(cb, WiSEFTCallback):
            if not 0.0 <= float(cb.alpha) <= 1.0:
                raise ValueError(f"WiSEFTCallback alpha must be within [0, 1], got {cb.alpha!r}")
            if cb.keys_to_ignore:
                raise ValueError("WiSEFTCallback keys_to_ignore is not supported")
            out["wise_ft_alpha"] = float(cb.alpha)
        elif isinstance(cb, WandBLogger):
            raise ValueError("WandBLogger is not supported: follow runs with run.stream_logs() and the trainer's Prometheus metrics")
        else:
            raise ValueError(f"callback {cb!r} is not one of clipft.callback's")
    for key in ("best_model", "early_stopping"):
        monitor = out.get(key, {}).get("name") or out.get(key, {}).get("monitor", {}).get("name")
        if monitor and monitor not in ("train_loss", "val_loss") and "query_data" not in out:
            raise ValueError(f"{key} monitors {monitor!r}, a retrieval metric: add an EvaluationCallback")
    return out


def _mode(mode: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode {mode!r}: use 'auto', 'min' or 'max'")
    return mode


def _push(session, value: Any, role: str, run_name: str, pushed: List[str], names: List[str],
          csv_options: Optional[CSVOptions] = None, seed: int = 0) -> str:
    """The dataset name for ``value``: a DocumentArray or a local file is pushed as
    ``<run>-<role>``; any other string must name a dataset on the trainer. An open text file,
    and with ``csv_options`` a CSV file, is read here as Finetuner reads CSVs (see
    :mod:`clipft.data`)."""
    ds = f"{run_name}-{role}"
    rewrite = hasattr(value, "read") or (
        csv_options is not None
        and isinstance(value, (str, os.PathLike))
        and os.path.isfile(value)
        and data.looks_like_csv(os.fspath(value), csv_options)
    )
    if rewrite:
        with tempfile.TemporaryDirectory(prefix="clipft-") as tmp:
            path = os.path.join(tmp, f"{role}.csv")
            if data.rewrite_csv(value, csv_options, path, seed) == 0:
                raise ValueError(f"{role}_data has no rows (after csv_options)")
            session.push_dataset(ds, path, True)
        pushed.append(ds)
        return ds
    if is_documents(value):
        with tempfile.TemporaryDirectory(prefix="clipft-") as tmp:
            path = os.path.join(tmp, f"{role}.protobuf")
            if write_docarray(value, path) == 0:
                raise ValueError(f"{role}_data is an empty DocumentArray")
            session.push_dataset(ds, path, True)
        pushed.append(ds)
        return ds
    if isinstance(value, (str, os.PathLike)):
        p = os.fspath(value)
        if os.path.isfile(p):
            session.push_dataset(ds, p, True)
            pushed.append(ds)
            return ds
        if p in names:
            return p
        raise ValueError(
            f"{role}_data {p!r} is neither a file nor a dataset on the trainer "
            f"(datasets: {', '.join(names) or 'none'})"
        )
    raise TypeError(
        f"{role}_data must be a DocumentArray, a CSV or docarray file path, an open CSV file, or a dataset name; got {type(value).__name__}"
    )


def fit(
    model: str,
    train_data: Any,
    eval_data: Any = None,
    val_split: float = 0.0,
    model_artifact: Optional[str] = None,
    run_name: Optional[str] = None,
    description: Optional[str] = None,
    experiment_name: Optional[str] = None,
    model_options: Optional[Dict[str, Any]] = None,
    loss: str = "CLIPLoss",
    miner: Optional[str] = None,
    miner_options: Optional[Dict[str, Any]] = None,
    optimizer: str = "Adam",
    optimizer_options: Optional[Dict[str, Any]] = None,
    learning_rate: Optional[float] = None,
    epochs: int = 5,
    batch_size: Optional[int] = 64,
    callbacks: Optional[List[Any]] = None,
    scheduler: Optional[str] = None,
    scheduler_options: Optional[Dict[str, Any]] = None,
    freeze: bool = False,
    output_dim: Optional[int] = None,
    cpu: Optional[bool] = None,
    device: Optional[str] = None,
    num_workers: int = 4,
    to_onnx: bool = False,
    csv_options: Any = None,
    public: bool = False,
    num_items_per_class: int = 4,
    sampler: str = "auto",
    loss_options: Optional[Dict[str, Any]] = None,
    loss_optimizer: Optional[str] = None,
    loss_optimizer_options: Optional[Dict[str, Any]] = None,
    *,
    seed: int = 0,
    shuffle: bool = True,
    max_steps: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    dtype: str = "auto",
    scheduler_step: Optional[str] = None,
) -> Run:
    """Fine-tunes CLIP with CLIPLoss and returns the :class:`Run` at once; it trains in the
    background (in this process, or on the trainer given to :func:`login`).

    Finetuner's arguments, defaults and meaning. ``train_data`` / ``eval_data`` (validation loss)
    take a DocumentArray of parent Documents each holding a text chunk and an image chunk (blob,
    tensor or uri), a CSV (caption, image path) or docarray file path, or a pushed dataset's name.
    Without ``learning_rate`` the optimiser's default (1e-3) applies, as in Finetuner; CLIP is
    usually tuned at 1e-6 to 1e-5. ``device='cuda'`` / ``cpu=False`` train on the GPU where there
    is one. ``experiment_name`` files the run under that experiment (created on its first run;
    ``'default'`` without one); ``run_name`` must be unused on the trainer, whatever the
    experiment. ``val_split`` holds that fraction of ``train_data`` out for the validation loss
    when there is no ``eval_data`` (and is ignored when there is, as in Finetuner). ``model_artifact`` (a FINISHED run's ``artifact_id``) continues from that run's
    weights instead of ``model``'s; ``model`` still names the backbone. ``to_onnx=True`` adds
    ``model.onnx`` to each submodel of the artifact (Finetuner's inputs and output: ONNX Runtime and
    clip-as-service's ONNX executor load it), beside the safetensors clipft serves. What clipft cannot honour (another loss, a miner, an output_dim head,
    ...) raises ValueError before anything runs. Keyword-only extras: ``seed``, ``shuffle``,
    ``max_steps``, ``max_grad_norm`` and ``dtype`` (``auto``: bf16 on a GPU, f32 on the CPU).
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model is required: a backbone name such as 'openai/clip-vit-base-patch32'")
    why = _native.unsupported_backbone(model)
    if why:
        raise ValueError(why)
    if loss != "CLIPLoss":
        raise ValueError(f"loss {loss!r} is not supported: clipft fine-tunes CLIP with 'CLIPLoss'")
    _refuse("loss_options", loss_options, "CLIPLoss takes no options")
    _refuse("miner", miner, "CLIPLoss uses every in-batch pair; there is nothing to mine")
    _refuse("miner_options", miner_options, "there is no miner")
    _refuse("loss_optimizer", loss_optimizer, "CLIPLoss has no parameters of its own besides the logit scale")
    _refuse("loss_optimizer_options", loss_optimizer_options, "there is no loss optimiser")
    if model_artifact is not None and (
        not isinstance(model_artifact, str) or not _native.is_safe_name(model_artifact)
    ):
        raise ValueError(
            f"model_artifact {model_artifact!r}: give a finished run's artifact_id (its name)"
        )
    _refuse("model_options", model_options, "CLIP backbones take no options")
    _refuse("output_dim", output_dim, "the artifact keeps CLIP's projection width")
    if not isinstance(to_onnx, bool):
        raise TypeError(f"to_onnx must be a bool, got {type(to_onnx).__name__}")
    csv_options = data.check_options(csv_options)
    if scheduler_step is not None:
        # Finetuner 0.6's argument; 0.8 moved it into scheduler_options.
        scheduler_options = {**(scheduler_options or {}), "scheduler_step": scheduler_step}
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0 <= val_split < 1:
        raise ValueError(f"val_split must be a number in [0, 1), got {val_split!r}")
    if sampler not in ("auto", "random"):
        raise ValueError(
            f"sampler {sampler!r}: CLIPLoss contrasts each caption-image pair with the rest of a "
            "random batch; use 'auto' or 'random'"
        )
    if description is not None and not isinstance(description, str):
        raise TypeError(f"description must be a str, got {type(description).__name__}")
    if not isinstance(epochs, int) or not 1 <= epochs < 50:
        raise ValueError(f"epochs must be an int in [1, 50), got {epochs!r}")
    if batch_size is None:
        batch_size = 64
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if dtype not in ("auto", "f32", "bf16", "f16"):
        raise ValueError(f"dtype {dtype!r}: use 'auto', 'f32', 'bf16' or 'f16'")
    config: Dict[str, Any] = {"model": model, "epochs": epochs, "batch_size": batch_size}
    if model_artifact is not None:
        config["model_artifact"] = model_artifact
    config.update(_hyper_parameters(optimizer, optimizer_options, learning_rate, scheduler, scheduler_options))
    config["device"] = _device(device, cpu)
    config["freeze"] = ["backbone"] if freeze else []
    config["seed"] = int(seed)
    config["shuffle"] = bool(shuffle)
    config["dtype"] = dtype
    if description:
        config["description"] = description
    if max_steps is not None:
        config["max_steps"] = int(max_steps)
    if max_grad_norm is not None:
        config["max_grad_norm"] = float(max_grad_norm)
    if to_onnx:
        config["to_onnx"] = True
    cb = _callbacks(callbacks)
    datasets = {"train": train_data, "eval": eval_data,
                "query": cb.pop("query_data", None), "index": cb.pop("index_data", None)}
    config.update(cb)
    if eval_data is None and val_split:
        config["val_split"] = float(val_split)
    if eval_data is None and not val_split:
        for key in ("best_model", "early_stopping"):
            m = config.get(key) or {}
            if (m.get("name") or m.get("monitor", {}).get("name")) == "val_loss":
                raise ValueError(f"{key} monitors 'val_loss', which needs eval_data or val_split (or monitor 'train_loss')")
    if datasets["query"] is None:
        config["eval_every"] = 0

    session = _get_session()
    if session is _local and config["device"] != "auto":
        # Local runs train on this machine with this build: a device it cannot open is refused
        # now, not when the run starts.
        problem = _native.device_problem(config["device"])
        if problem:
            raise ValueError(problem)
    if run_name is None:
        run_name = _native.random_run_name()
    for what, name in (("run_name", run_name), ("experiment_name", experiment_name)):
        if name is not None and not _native.is_safe_name(name):
            raise ValueError(
                f"{what} {name!r}: use letters, digits, '-', '_' and '.', at most 128, not starting with '.'"
            )
    try:
        session.get_run(run_name)
    except NotFoundError:
        pass
    else:
        raise AlreadyExistsError(f"run {run_name!r} already exists; choose another run_name or delete_run it")
    names = [d["name"] for d in json.loads(session.list_datasets())]
    pushed: List[str] = []
    try:
        for role, value in datasets.items():
            if value is not None:
                config[f"{role}_data"] = _push(
                    session, value, role, run_name, pushed, names, csv_options, int(seed)
                )
        record = json.loads(session.create_run(run_name, json.dumps(config), experiment_name or ""))
    except BaseException:
        for ds in pushed:
            try:
                session.delete_dataset(ds)
            except ClipftError:
                pass
        raise
    run = Run(session, record)
    # A trainer with a free slot starts the run within milliseconds: wait that long, so that
    # code calling run.logs() right after fit sees a STARTED run. A queued run stays CREATED.
    deadline = time.monotonic() + 2.0
    while run.status()["status"] == "CREATED" and time.monotonic() < deadline:
        time.sleep(0.02)
    return run


create_run = fit
create_training_run = fit


# ---------------------------------------------------------------------------------------------
# runs


def get_run(run_name: str, experiment_name: Optional[str] = None) -> Run:
    """The run called ``run_name`` (local runs of earlier Python sessions included). Run names
    are unique on the trainer, so the experiment is optional; when given, a run of another
    experiment raises NotFoundError."""
    session = _get_session()
    return Run(session, json.loads(session.get_run(run_name, experiment_name or "")))


def list_runs(experiment_name: Optional[str] = None, page: int = 1, size: int = 50) -> List[Run]:
    """Every run, oldest first, or the runs of ``experiment_name`` (``page`` / ``size`` as
    Finetuner 0.8 paged them)."""
    _check_page(page, size)
    session = _get_session()
    return [Run(session, r) for r in json.loads(session.list_runs(experiment_name or "", page, size))]


def delete_run(run_name: str, experiment_name: Optional[str] = None) -> None:
    """Deletes a run that is not training (cancel it first), with its logs and artifact."""
    _get_session().delete_run(run_name, experiment_name or "")


def delete_runs(experiment_name: Optional[str] = None) -> None:
    """Deletes every run (of ``experiment_name`` when given) that is not training."""
    _delete_unstarted(_get_session(), experiment_name or "")


# ---------------------------------------------------------------------------------------------
# experiments


def create_experiment(name: str = DEFAULT_EXPERIMENT) -> Experiment:
    """A new, empty experiment (AlreadyExistsError when one has the name; ``'default'``
    always exists). ``fit(experiment_name=...)`` also creates one on its first run."""
    session = _get_session()
    return Experiment(session, json.loads(session.create_experiment(name)))


def get_experiment(name: str) -> Experiment:
    """The experiment ``name`` (NotFoundError when there is none)."""
    session = _get_session()
    return Experiment(session, json.loads(session.get_experiment(name)))


def list_experiments(page: int = 1, size: int = 50) -> List[Experiment]:
    """Every experiment, oldest first."""
    session = _get_session()
    found = [Experiment(session, x) for x in json.loads(session.list_experiments())]
    return _page(found, page, size)


def delete_experiment(name: str) -> Experiment:
    """Deletes the experiment with all its runs (logs, artifacts and the datasets pushed for
    them) and returns it as it was. Refused (TrainerError) while one of its runs trains:
    cancel it first. ``'default'`` stays, emptied."""
    session = _get_session()
    return Experiment(session, json.loads(session.delete_experiment(name)))


def delete_experiments() -> List[Experiment]:
    """Deletes every experiment as :func:`delete_experiment` does and returns them. Those with
    a run in training are kept; the error then names them, after the others were deleted."""
    session = _get_session()
    deleted, refused = [], []
    for x in json.loads(session.list_experiments()):
        try:
            deleted.append(Experiment(session, json.loads(session.delete_experiment(x["name"]))))
        except TrainerError as e:
            refused.append(str(e))
    if refused:
        raise TrainerError("; ".join(refused))
    return deleted


# ---------------------------------------------------------------------------------------------
# models


def list_models() -> List[str]:
    """The backbones clipft knows by name (any CLIP checkpoint in Hugging Face layout loads)."""
    return [b["name"] for b in _native.backbones()]


def list_model_options() -> Dict[str, List[Dict[str, Any]]]:
    """Each backbone's ``model_options`` (Finetuner's shape: name -> the options, each a dict
    of name, type, required, default, description). CLIP backbones take none: the lists are
    empty, and ``fit(model_options=...)`` refuses any."""
    return {name: [] for name in list_models()}


def describe_models(task: Optional[str] = None) -> None:
    """Prints the backbones: name, task, output_dim, architecture, description."""
    rows = [b for b in _native.backbones() if task in (None, b["task"])]
    title = "clipft backbones" + (f": {task}" if task else "")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich comes with docarray
        print(title)
        for b in rows:
            print(f"{b['name']:<36} {b['task']:<14} {b['output_dim']:>6} {b['architecture']:<12} {b['description']}")
        return
    table = Table(title=title)
    # Names are what users copy into fit(model=...): never wrapped, however narrow the terminal.
    table.add_column("name", no_wrap=True)
    for col in ("task", "output_dim", "architecture", "description"):
        table.add_column(col)
    for b in rows:
        desc = b["description"] + (f" (Finetuner: {b['display_name']})" if b["display_name"] else "")
        table.add_row(b["name"], b["task"], str(b["output_dim"]), b["architecture"], desc)
    Console().print(table)


def list_callbacks() -> Dict[str, type]:
    """The callback classes ``fit`` takes."""
    return {c.__name__: c for c in (EvaluationCallback, BestModelCheckpoint, EarlyStopping,
                                     TrainingCheckpoint, WiSEFTCallback)}


class InferenceEngine:
    """One submodel loaded for :func:`encode`: ``select_model``, ``batch_size``, ``device``."""

    def __init__(self, native, batch_size: int):
        self._native = native
        self.batch_size = batch_size

    @property
    def select_model(self) -> str:
        return self._native.select_model

    @property
    def device(self) -> str:
        return self._native.device

    @property
    def output_dim(self) -> int:
        return self._native.output_dim

    def __repr__(self) -> str:
        return f"InferenceEngine({self._native.source!r}, select_model={self.select_model!r}, device={self.device!r})"


def _has_onnx(spec: str, select_model: str) -> Optional[bool]:
    """Whether the artifact ``spec`` (folder or zip) holds ``select_model``'s ``model.onnx``;
    None when ``spec`` is not an artifact (a Hugging Face folder or repo id)."""
    tail = f"models/{select_model}/model.onnx"
    if os.path.isdir(spec):
        if not os.path.isdir(os.path.join(spec, "models")):
            return None
        return os.path.isfile(os.path.join(spec, *tail.split("/")))
    if os.path.isfile(spec) and zipfile.is_zipfile(spec):
        with zipfile.ZipFile(spec) as z:
            return any(n == tail or n.endswith("/" + tail) for n in z.namelist())
    return None


def _load(spec: str, select_model: Optional[str], batch_size: int, device: Optional[str],
          is_onnx: bool, backbone: Optional[str] = None) -> InferenceEngine:
    if select_model is None:
        raise SelectModelRequired(
            f"{spec} is a CLIP model with two submodels: pass select_model='clip-text' or 'clip-vision'"
        )
    if select_model not in CLIP_MODELS:
        raise NoSuchModel(f"{spec} has no model {select_model!r}: it holds clip-text and clip-vision")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if is_onnx and _has_onnx(os.fspath(spec), select_model) is False:
        # Finetuner's loader finds no ONNX model in an artifact of a run without to_onnx.
        raise ValueError(
            f"is_onnx=True: {spec} holds no {select_model}/model.onnx; fit with to_onnx=True, "
            "or load it with is_onnx=False"
        )
    dev = device or "auto"
    native = _native.Model.load(os.fspath(spec), select_model, dev, "auto", backbone)
    return InferenceEngine(native, batch_size)


def get_model(
    artifact: str,
    token: Optional[str] = None,
    batch_size: int = 32,
    select_model: Optional[str] = None,
    device: Optional[str] = None,
    logging_level: str = "WARNING",
    is_onnx: bool = False,
    backbone: Optional[str] = None,
) -> InferenceEngine:
    """Loads one submodel for :func:`encode`: ``artifact`` is a ``save_artifact`` zip, a
    finished run's ``artifact_id`` (its name), an artifact folder (clipft's or Finetuner's; ``backbone`` names the base model of a Finetuner
    artifact whose metadata does not), a Hugging Face folder or a hub repo id. A CLIP model
    needs ``select_model`` (``'clip-text'`` or ``'clip-vision'``). ``device``: None picks the
    GPU where there is one, else the CPU. ``is_onnx=True`` asks for the artifact's ONNX model,
    as Finetuner's did: an artifact without one (fit without ``to_onnx``) raises ValueError; for
    a Hugging Face folder or hub id, which hold no graph, it changes nothing.
    clipft's core computes the embeddings, from the weights stored beside the graph; the graph
    gives the same numbers (within 1e-5 relative, tests/onnx.rs)."""
    spec = os.fspath(artifact)
    if not os.path.exists(spec) and _native.is_safe_name(spec):
        # Finetuner's `get_model(run.artifact_id)`: the artifact of a finished run, by name.
        session = _get_session()
        try:
            finished = json.loads(session.get_run(spec))["status"] == "FINISHED"
        except NotFoundError:
            finished = False
        if finished:
            with tempfile.TemporaryDirectory(prefix="clipft-") as tmp:
                zip_path = session.download_artifact(spec, os.path.join(tmp, f"{spec}.zip"))
                # The loaded model keeps its own unpacked copy; the zip can go.
                return _load(zip_path, select_model, batch_size, device, is_onnx, backbone)
    return _load(spec, select_model, batch_size, device, is_onnx, backbone)


def build_model(
    name: str,
    model_options: Optional[Dict[str, Any]] = None,
    batch_size: int = 32,
    select_model: Optional[str] = None,
    device: Optional[str] = None,
    is_onnx: bool = False,
) -> InferenceEngine:
    """The pre-trained backbone ``name`` (a zero-shot baseline), as :func:`get_model` loads it.
    ``is_onnx`` changes nothing: the embeddings are those ``clipft export``'s graph of the
    backbone gives."""
    _refuse("model_options", model_options, "CLIP backbones take no options")
    why = _native.unsupported_backbone(name)
    if why:
        raise ValueError(why)
    return _load(name, select_model, batch_size, device, is_onnx)


def encode(model: InferenceEngine, data: Any, batch_size: Optional[int] = None):
    """Embeds ``data`` with ``model``, ``batch_size`` items per forward pass (the model's own,
    32, by default).

    A DocumentArray (or list of Documents) is filled in place (``.embeddings``) and returned:
    texts for ``clip-text``, images (tensor, blob or uri) for ``clip-vision``. A list of strings
    gives a float32 ``np.ndarray``: texts, or image paths/URIs for ``clip-vision``. Computation
    runs in the Rust core with the GIL released; Ctrl-C stops between batches."""
    import numpy as np

    if not isinstance(model, InferenceEngine):
        raise TypeError("model must come from get_model or build_model")
    bs = batch_size or model.batch_size
    if not isinstance(bs, int) or bs < 1:
        raise ValueError(f"batch_size must be a positive int, got {bs!r}")
    native = model._native
    text = model.select_model == "clip-text"
    docs = is_documents(data)
    if not docs:
        if isinstance(data, str) or not isinstance(data, (list, tuple)) or not all(isinstance(x, str) for x in data):
            raise TypeError("data must be a DocumentArray, a list of Documents or a list of str")
    n = len(data)
    out = np.empty((n, model.output_dim), dtype=np.float32)
    for start in range(0, n, bs):
        part = data[start : start + bs]
        if text:
            items = [text_item(d, f"data[{start + i}]") for i, d in enumerate(part)] if docs else list(part)
            raw, rows, dim = native.encode_texts(items)
        else:
            items = [image_item(d, f"data[{start + i}]") for i, d in enumerate(part)] if docs else [("uri", u) for u in part]
            raw, rows, dim = native.encode_images(items)
        out[start : start + rows] = np.frombuffer(raw, dtype="<f4").reshape(rows, dim)
    if not docs:
        return out
    from docarray import DocumentArray

    if isinstance(data, DocumentArray):
        data.embeddings = out
    else:
        for d, e in zip(data, out):
            d.embedding = e
    return data


def cos_sim(a, b) -> float:
    """Cosine similarity of two vectors."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


#: Finetuner 0.6's name for :func:`login` in notebooks.
notebook_login = login


def __getattr__(name: str):
    # Finetuner re-exports docarray's Document and DocumentArray (`finetuner.DocumentArray`);
    # imported on first use, as docarray is slow to import.
    if name in ("Document", "DocumentArray"):
        import docarray

        return getattr(docarray, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _stand_in_for_finetuner() -> None:
    """Registers this package as ``finetuner`` (with ``finetuner.callback``, ``.data``, ``.run``,
    ``.experiment``, ``.excepts``) where no Finetuner is installed, so that the
    ``from finetuner.callback import EvaluationCallback`` lines of a notebook that changed only
    its ``import finetuner`` line to ``import clipft as finetuner`` still work.
    ``CLIPFT_NO_FINETUNER_ALIAS=1`` turns this off."""
    if os.environ.get("CLIPFT_NO_FINETUNER_ALIAS", "") not in ("", "0") or "finetuner" in sys.modules:
        return
    import importlib.util

    try:
        if importlib.util.find_spec("finetuner") is not None:
            return
    except (ImportError, ValueError):
        return
    sys.modules["finetuner"] = sys.modules[__name__]
    for name, module in (("callback", callback), ("data", data), ("run", run),
                         ("experiment", experiment), ("excepts", exception),
                         ("exception", exception)):
        sys.modules[f"finetuner.{name}"] = module


_stand_in_for_finetuner()


__all__ = [
    "login", "notebook_login", "fit", "create_run", "create_training_run", "get_run", "list_runs", "delete_run",
    "delete_runs", "create_experiment", "get_experiment", "list_experiments", "delete_experiment",
    "delete_experiments", "Experiment", "list_models", "list_model_options", "describe_models", "get_token", "list_callbacks", "get_model", "build_model",
    "encode", "cos_sim", "Run", "InferenceEngine",
    "EvaluationCallback", "BestModelCheckpoint", "EarlyStopping", "TrainingCheckpoint",
    "WiSEFTCallback", "WandBLogger",
    "ClipftError", "TrainerError", "FinetunerServerError", "AuthenticationError", "NotFoundError",
    "AlreadyExistsError", "RunPreparingError", "RunInProgressError", "RunFailedError",
    "SelectModelRequired", "NoSuchModel", "UserNotLoggedInError", "CSVOptions",
    "build_encoding_dataset", "Document", "DocumentArray",
]
