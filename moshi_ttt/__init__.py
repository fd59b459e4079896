"""moshi-ttt: batch, offline inference for Moshi fine-tuned with Test-Time Training layers.

Importing the package is cheap (no torch, no moshi), so `moshi-ttt --help` is instant. moshi
decides at import time whether to torch.compile (which must be off on CPU, see
`runtime.prepare_environment`), so the package installs a hook that prepares the process the
first time anything imports moshi. Set $MOSHI_TTT_DEVICE (or call `runtime.prepare_runtime`)
before that to choose the device; the default is "auto".
"""

import importlib.abc
import sys

__version__ = "0.1.0"


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
