"""Sampling controls: moshi's `LMGen` keyword arguments, overriding a checkpoint's `lm_gen_config`.

No torch here: the CLI validates these before anything loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import MoshiTTTError


@dataclass
class Sampling:
    """What a run changes about sampling; None keeps the checkpoint's (or moshi's default) value."""

    temp: float | None = None  # audio tokens
    temp_text: float | None = None
    top_k: int | None = None  # audio tokens
    top_k_text: int | None = None
    greedy: bool = False  # argmax everywhere (LMGen's use_sampling=False)

    def check(self) -> "Sampling":
        """Refuse values `LMGen` would misuse: a temperature must be a positive finite number (0
        divides by zero; use --greedy), top-k at least 1."""
        for name in ("temp", "temp_text"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise MoshiTTTError(f"--{name.replace('_', '-')} must be a positive number (use --greedy for "
                                    f"argmax), got {value}")
        for name in ("top_k", "top_k_text"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MoshiTTTError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        return self

    def overrides(self) -> dict:
        """The `LMGen` kwargs this run sets."""
        kwargs: dict = {name: getattr(self, name) for name in ("temp", "temp_text", "top_k", "top_k_text")
                        if getattr(self, name) is not None}
        if self.greedy:
            kwargs["use_sampling"] = False
        return kwargs

    def apply(self, lm_gen_config: dict) -> dict:
        """The checkpoint's `lm_gen_config` with this run's overrides on top."""
        return {**lm_gen_config, **self.overrides()}
