"""Which exceptions mean that a user's input is wrong (a config value, a data directory, a
checkpoint, a model name, an output directory, a saved adapter, a missing optional package), as
opposed to a failure of fedlease itself. The command lines, fedlease's and the benchmarks', turn
these into one line naming the culprit and exit status 2."""

from __future__ import annotations


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types of bad input; imported on first use, so that ``--help`` stays fast."""
    from .adapter_io import AdapterError
    from .data import DataError
    from .fl.checkpoint import CheckpointError
    from .fl.config import ConfigError
    from .fl.rundir import OutputError
    from .models import ModelError

    return (ConfigError, DataError, CheckpointError, ModelError, OutputError, AdapterError,
            ImportError)  # fmt: skip
