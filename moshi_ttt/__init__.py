"""moshi-ttt: batch, offline inference for Moshi fine-tuned with Test-Time Training layers.

The library's API, re-exported here lazily (importing the package loads no torch):

    from moshi_ttt import RunOptions, run_batch
    outcome = run_batch("recordings/", "outputs/", RunOptions(base=..., checkpoint=..., batch_size=8))
    outcome.report.totals()

`run_batch` (infer or, with `RunOptions(score=ScoreOptions())`, score a file, folder or manifest),
the options (`RunOptions`, `Sampling`, `RayOptions`, `ScoreOptions`), `load_model` (a base plus
fine-tune, for your own loops), `inspect_finetune`, the events (`ProgressBar`, the default in a
library run; `SilentEvents`) and the errors (`MoshiTTTError`, `OptionError`).

Importing the package is cheap (no torch, no moshi), so `moshi-ttt --help` is instant. moshi
decides at import time whether to torch.compile (which must be off on CPU, see
`runtime.prepare_environment`), so the package installs a hook that prepares the process the
first time anything imports moshi. Set $MOSHI_TTT_DEVICE (or call `runtime.prepare_runtime`)
before that to choose the device; the default is "auto".
"""

import importlib.abc
import sys

__version__ = "0.1.0"

# Public name -> module that defines it (imported on first use).
_API = {
    "run_batch": "run",
    "RunOutcome": "run",
    "RunOptions": "options",
    "Sampling": "options",
    "RayOptions": "options",
    "ScoreOptions": "options",
    "OptionError": "options",
    "MoshiTTTError": "errors",
    "load_model": "checkpoints.model",
    "LoadedModel": "checkpoints.model",
    "inspect_finetune": "checkpoints.inspection",
    "ProgressBar": "events",
    "SilentEvents": "events",
    "BatchEvents": "events",
    "Report": "report.schema",
    "FileResult": "report.schema",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module 'moshi_ttt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _PrepareBeforeMoshi(importlib.abc.MetaPathFinder):
    """Runs `prepare_environment` when moshi is first imported, then steps aside (finds nothing)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "moshi":
            sys.meta_path.remove(self)
            from .runtime import prepare_environment

            prepare_environment()
        return None


if "moshi" not in sys.modules and not any(isinstance(f, _PrepareBeforeMoshi) for f in sys.meta_path):
    sys.meta_path.insert(0, _PrepareBeforeMoshi())
