"""moshi-ttt: batch, offline inference for Moshi fine-tuned with Test-Time Training layers."""

import os as _os

from .runtime import prepare_environment

# moshi reads NO_TORCH_COMPILE when it is imported, so this runs before any moshi import.
# The CLI sets MOSHI_TTT_DEVICE from --device before it imports the library.
prepare_environment(_os.environ.get("MOSHI_TTT_DEVICE", "auto"))

__version__ = "0.1.0"
