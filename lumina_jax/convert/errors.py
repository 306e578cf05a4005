"""The one exception conversion commands raise for problems in their input."""
from __future__ import annotations

import contextlib
from typing import Iterator

from lumina_jax.param_checkpoint import CheckpointError


class ConversionError(RuntimeError):
    """A problem with the input that the user can fix (file, key, shape, config field); printed as one line."""


@contextlib.contextmanager
def checkpoint_errors_as_conversion_errors() -> Iterator[None]:
    """Re-raises a CheckpointError (an output path refused, an unreadable checkpoint) as a ConversionError."""
    try:
        yield
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
