"""Exception types with messages meant for the person running the pipeline.

Every error a user can cause (a wrong path, an unknown product, a corrupt file, a tampered model)
is a :class:`PadimError` whose message is one readable sentence, so the command line can print it
without a traceback.
"""

from __future__ import annotations


class PadimError(Exception):
    """Base class of every error the pipeline reports to its user."""


class ConfigError(PadimError, ValueError):
    """A configuration value is invalid or inconsistent."""


class WeightsUnavailableError(PadimError):
    """Backbone weights cannot be found offline or fail verification."""


class WeightsMismatchError(WeightsUnavailableError, ValueError):
    """A weights file's sha256 differs from the one expected (the registry's or the model's)."""


class WeightsNotAllowedError(WeightsUnavailableError, ValueError):
    """A model manifest names backbone weights outside the locations a loaded model may read."""


class ImageDecodeError(PadimError):
    """One image cannot be read or decoded; the run records it and goes on."""


class ModelNotFoundError(PadimError):
    """No model (or no such version) exists for a product in the store."""


class ModelIntegrityError(PadimError):
    """A model artifact does not match its recorded checksums (altered or truncated)."""


class IncompatibleModelError(PadimError):
    """A model artifact cannot be served by the running code (format, backbone or shape mismatch)."""


class StoreError(PadimError):
    """The model store or the report store cannot complete an operation."""


class ImageReadError(StoreError):
    """Storage could not deliver an image's bytes (network, endpoint or I/O fault), after retries.

    Unlike :class:`ImageDecodeError` this says nothing about the file: the work that needed it
    fails (and its task is retried) instead of recording the image as bad.
    """

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"could not read {uri}: {reason}")
        self.uri = uri
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Rebuild from ``(uri, reason)`` (Dask sends exceptions between processes)."""
        return (type(self), (self.uri, self.reason))


class IncompleteRunError(PadimError):
    """Part of a run's work failed after its retries (the rest was done and kept); re-run it."""


class InvalidProductNameError(PadimError, ValueError):
    """A product name is not a safe identifier (it would escape the store layout)."""


class ImageSourceError(PadimError):
    """An image source (a local folder or an object-store prefix) cannot be listed."""
