"""An experiment on a trainer, as Finetuner's ``Experiment``: a named group of runs."""

import json
from typing import Any, List

from .run import Run, _Record


def _iso(unix: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _delete_unstarted(session, experiment: str) -> None:
    """Deletes every run (of ``experiment`` unless empty) that is not training."""
    for r in json.loads(session.list_runs(experiment)):
        if r["status"] != "STARTED":
            session.delete_run(r["name"], "")


def _check_page(page: int, size: int) -> None:
    """Finetuner 0.8's paging: ``page`` from 1, ``size`` items per page."""
    if not isinstance(page, int) or not isinstance(size, int) or page < 1 or size < 1:
        raise ValueError(f"page and size are ints from 1, got page={page!r}, size={size!r}")


def _page(items: List[Any], page: int, size: int) -> List[Any]:
    _check_page(page, size)
    return items[(page - 1) * size : page * size]


class Experiment(_Record):
    """A group of runs (one task, a run per configuration tried). Runs join one through
    ``fit(experiment_name=...)`` or :meth:`create_run`; the experiment ``'default'`` holds the
    runs that name none. Run names are unique on the trainer across experiments."""

    @property
    def status(self) -> str:
        """``'ACTIVE'``, as Finetuner's experiments said."""
        return self._record.get("status") or "ACTIVE"

    @property
    def created_at(self) -> str:
        """When the experiment was created (ISO 8601, UTC)."""
        return _iso(int(self._record.get("created_unix") or 0))

    @property
    def description(self) -> str:
        return ""

    def get_run(self, name: str) -> Run:
        """The run ``name`` of this experiment (NotFoundError for another experiment's run)."""
        return Run(self._session, json.loads(self._session.get_run(name, self.name)))

    def list_runs(self, page: int = 1, size: int = 50) -> List[Run]:
        """The experiment's runs, oldest first."""
        _check_page(page, size)
        found = json.loads(self._session.list_runs(self.name, page, size))
        return [Run(self._session, r) for r in found]

    def delete_run(self, name: str) -> None:
        """Deletes the experiment's run ``name`` (cancel it first if it trains)."""
        self._session.delete_run(name, self.name)

    def delete_runs(self) -> None:
        """Deletes every run of the experiment that is not training."""
        _delete_unstarted(self._session, self.name)

    def create_run(self, model: str, train_data: Any, **kwargs) -> Run:
        """``fit`` in this experiment: the same arguments, the run goes where :func:`login`
        sends runs."""
        from . import fit

        if kwargs.get("experiment_name") not in (None, self.name):
            raise ValueError(
                f"experiment_name {kwargs['experiment_name']!r}: this is experiment {self.name!r}"
            )
        kwargs["experiment_name"] = self.name
        return fit(model, train_data, **kwargs)

    create_training_run = create_run

    def __repr__(self) -> str:
        return f"Experiment(name={self.name!r}, status={self.status!r})"
