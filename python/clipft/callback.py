"""Finetuner's callbacks (``finetuner.callback``), as the run configuration takes them.

Each is a plain dataclass with Finetuner's fields and defaults; :func:`clipft.fit` turns the list
into the run's settings and refuses what clipft's trainer cannot honour, before anything runs.
"""

from dataclasses import dataclass, field
from typing import Any, List, Optional, Union


@dataclass
class EvaluationCallback:
    """Retrieval metrics (docarray's nine, text queries against the image index by
    ``finetuner_label``) before training, after every epoch and after training.

    ``query_data`` / ``index_data``: a DocumentArray, a CSV or docarray file, or a pushed
    dataset's name. For CLIP, queries are texts and the index images (``model='clip-text'``,
    ``index_model='clip-vision'``, the defaults here). ``distance``: ``'cosine'``,
    ``'euclidean'`` or ``'sqeuclidean'``, as docarray orders matches. ``query_sample_size``
    evaluates a seeded sample of that many queries (the same ones before, during and after
    training) when there are more. Finetuner's later fields are here so its code constructs:
    ``multi_modal`` and
    ``exclude_self`` change nothing for text queries against images; ``steps_per_interval``,
    ``caption`` and ``output_model_names`` are refused by :func:`clipft.fit` when set.
    """

    query_data: Any
    index_data: Any = None
    model: Optional[str] = None
    index_model: Optional[str] = None
    batch_size: int = 32
    exclude_self: bool = True
    limit: int = 20
    distance: str = "cosine"
    num_workers: int = 8
    gather_examples: bool = False
    num_example_queries: int = 5
    steps_per_interval: Optional[int] = None
    caption: Optional[str] = None
    output_model_names: bool = False
    query_sample_size: Optional[int] = None
    multi_modal: bool = False


@dataclass
class BestModelCheckpoint:
    """The artifact holds the weights of the best epoch by ``monitor`` (``val_loss``,
    ``train_loss`` or a retrieval metric such as ``precision_at_k``); ``mode`` ``auto`` is min
    for losses and max for metrics."""

    monitor: str = "val_loss"
    mode: str = "auto"


@dataclass
class EarlyStopping:
    """Stops when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    monitor: str = "val_loss"
    mode: str = "auto"
    patience: int = 2
    min_delta: float = 0
    baseline: Optional[float] = None


@dataclass
class TrainingCheckpoint:
    """Resumable checkpoints: clipft writes one at every epoch end (and every
    ``checkpoint_seconds`` within an epoch), keeping the latest; an interrupted run resumes from
    it. ``last_k_epochs`` is accepted for compatibility (only the latest is needed to resume)."""

    last_k_epochs: int = 1
    checkpoint_seconds: Optional[int] = None


@dataclass
class WiSEFTCallback:
    """WiSE-FT: the artifact holds ``alpha * fine-tuned + (1 - alpha) * pre-trained``."""

    alpha: float = 0.4
    keys_to_ignore: Optional[List[str]] = field(default=None)


@dataclass
class WandBLogger:
    """Accepted so Finetuner code constructs; clipft does not log to Weights & Biases and
    refuses it in ``fit``."""

    wandb_args: Optional[dict] = None


Callback = Union[
    EvaluationCallback, BestModelCheckpoint, EarlyStopping, TrainingCheckpoint, WiSEFTCallback
]

__all__ = [
    "EvaluationCallback",
    "BestModelCheckpoint",
    "EarlyStopping",
    "TrainingCheckpoint",
    "WiSEFTCallback",
    "WandBLogger",
]
