"""Exceptions, named as Finetuner named them (``finetuner.exception`` and the model loader's
``SelectModelRequired`` / ``NoSuchModel``), all below :class:`ClipftError`."""

from ._native import (  # noqa: F401  (re-exported)
    AlreadyExistsError,
    AuthenticationError,
    ClipftError,
    NotFoundError,
    TrainerError,
)

#: Finetuner's name for an error the service answered with.
FinetunerServerError = TrainerError


class RunPreparingError(ClipftError):
    """The run is CREATED (queued): it has no logs yet."""


class RunInProgressError(ClipftError):
    """The run is CREATED or STARTED: it has no artifact yet."""


class RunFailedError(ClipftError):
    """The run FAILED (or was CANCELED): it has no artifact; ``run.logs()`` says why."""


class SelectModelRequired(ClipftError, ValueError):
    """A CLIP model holds two submodels: pass ``select_model='clip-text'`` or ``'clip-vision'``."""


class NoSuchModel(ClipftError, ValueError):
    """``select_model`` names a submodel the artifact does not hold."""


class UserNotLoggedInError(ClipftError):
    """Kept for Finetuner code that catches it; clipft logs in on first use."""
