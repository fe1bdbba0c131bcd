"""A run on a trainer (local or remote), as Finetuner's ``Run``."""

import json
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional

from .exception import RunFailedError, RunInProgressError, RunPreparingError

from ._native import metric_names

#: The nine retrieval metrics, in Finetuner's order (the core's list).
METRIC_NAMES = tuple(metric_names())


class _Record:
    """What the trainer last said about a run or an experiment, and the session that asks it
    again."""

    def __init__(self, session, record: Dict[str, Any]):
        self._session = session
        self._record = record

    @property
    def name(self) -> str:
        """The name, unique on the trainer."""
        return self._record["name"]


class Run(_Record):
    """A fine-tuning run. ``status()``, ``logs()``, ``stream_logs()`` and ``metrics()`` ask the
    trainer each time; ``save_artifact()`` downloads the finished run's artifact zip."""

    @property
    def experiment_name(self) -> str:
        """The experiment the run belongs to."""
        return self._record.get("experiment") or "default"

    @property
    def description(self) -> str:
        """What the run tries, as ``fit(description=...)`` said."""
        return (self._record.get("config") or {}).get("description") or ""

    @property
    def config(self) -> Dict[str, Any]:
        """The run's configuration as the trainer keeps it (datasets by name)."""
        return dict(self._record.get("config") or {})

    @property
    def artifact_id(self) -> str:
        """What names the artifact: the run's name, once the run is FINISHED."""
        self._check_finished()
        return self.name

    def _refresh(self) -> Dict[str, Any]:
        self._record = json.loads(self._session.get_run(self.name))
        return self._record

    def status(self) -> Dict[str, str]:
        """``{'status': 'CREATED'|'STARTED'|'FINISHED'|'FAILED'|'CANCELED', 'details': ...}``."""
        r = self._refresh()
        return {"status": r["status"], "details": r["details"]}

    def progress(self) -> Dict[str, Any]:
        """Where the run stands: step, total_steps, epoch, epochs and the latest loss."""
        return dict(self._refresh()["progress"])

    def logs(self) -> str:
        """The run's log so far. Raises :class:`RunPreparingError` while the run is queued."""
        if self.status()["status"] == "CREATED":
            raise RunPreparingError(
                f"run {self.name} is CREATED (queued): it has no logs yet; try again once it started"
            )
        text, _ = self._session.read_logs(self.name, 0)
        return text

    def stream_logs(self, interval: int = 5) -> Iterator[str]:
        """Yields the log's lines as they are written, from the start, until the run ends.
        While the run is queued it checks every ``interval`` seconds. Ctrl-C stops following
        (KeyboardInterrupt); the run goes on."""
        while self.status()["status"] == "CREATED":
            time.sleep(max(interval, 0.1))
        follower = self._session.follow_logs(self.name)
        try:
            for text, _state in follower:
                for line in text.splitlines():
                    yield line
        except KeyboardInterrupt:
            print(
                f"stopped following the logs; run {self.name} goes on "
                "(run.stream_logs() follows it again)",
                file=sys.stderr,
            )
            raise
        finally:
            del follower

    def metrics(self) -> Dict[str, Dict[str, float]]:
        """Retrieval metrics: ``{'before': {...}, 'after': {...}}``, each the nine metrics (empty
        without an EvaluationCallback, or until the run measured them)."""
        m = json.loads(self._session.metrics(self.name))
        return {"before": m.get("before") or {}, "after": m.get("after") or {}}

    def epoch_metrics(self) -> Dict[int, Dict[str, float]]:
        """Retrieval metrics after each epoch (1-based), where the run measured them."""
        m = json.loads(self._session.metrics(self.name))
        return {e["epoch"]: e["metrics"] for e in m.get("epochs") or []}

    def display_metrics(self) -> None:
        """Prints the before/after table."""
        m = self.metrics()
        if not m["before"] and not m["after"]:
            print(f"run {self.name} has no retrieval metrics (give fit an EvaluationCallback)")
            return
        print(f"{'metric':<20} {'before':>10} {'after':>10}")
        for k in METRIC_NAMES:
            b, a = m["before"].get(k), m["after"].get(k)
            fmt = lambda v: f"{v:>10.4f}" if v is not None else f"{'-':>10}"  # noqa: E731
            print(f"{k:<20} {fmt(b)} {fmt(a)}")

    def example_results(self) -> Dict[str, Dict[str, List[str]]]:
        """Finetuner's example results (``EvaluationCallback(gather_examples=True)``):
        ``{'before': {query: [match, ...]}, 'after': {...}}``, the first
        ``num_example_queries`` queries with their top ``limit`` matches, best first (an image
        file by its path below the index data's folder, a URI as written, an image held in the
        data by its id). Empty until the run measured them."""
        m = json.loads(self._session.metrics(self.name)).get("examples") or {}
        return {
            stage: {x["query"]: list(x["matches"]) for x in m.get(stage) or []}
            for stage in ("before", "after")
        }

    def display_examples(self, k: int = 5) -> None:
        """Prints each stage's example queries with their top ``k`` matches."""
        results = self.example_results()
        if not results["before"] and not results["after"]:
            print(f"run {self.name} has no example results (give fit an "
                  "EvaluationCallback(gather_examples=True))")
            return
        for stage, queries in results.items():
            if not queries:
                continue
            print(f"Results {stage} fine-tuning:")
            for query, matches in queries.items():
                print(f"  Query    {query}")
                for i, match in enumerate(matches[:k]):
                    print(f"  Match {i + 1:<2} {match}")

    def _check_finished(self) -> None:
        s = self.status()
        if s["status"] in ("CREATED", "STARTED"):
            raise RunInProgressError(
                f"run {self.name} is {s['status']}: the artifact exists once it FINISHED ({s['details']})"
            )
        if s["status"] != "FINISHED":
            raise RunFailedError(f"run {self.name} is {s['status']}: {s['details']}")

    def save_artifact(self, directory: str = "artifacts/") -> str:
        """Downloads the artifact as ``<directory>/<run name>.zip`` and returns that path.
        Raises :class:`RunInProgressError` before the run finished and :class:`RunFailedError`
        when it failed or was canceled."""
        self._check_finished()
        dest = os.path.join(os.fspath(directory), f"{self.name}.zip")
        return os.fspath(self._session.download_artifact(self.name, dest))

    def cancel(self) -> None:
        """Cancels the run: at once while queued, before its next step while training."""
        self._record = json.loads(self._session.cancel_run(self.name))

    def __repr__(self) -> str:
        return f"Run(name={self.name!r}, status={self._record.get('status')!r})"
