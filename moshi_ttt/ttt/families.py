"""The TTT families this tool runs, and what each one owns. Importing this module is cheap (no
torch, no moshi), so the CLI can list the families in `--help` without loading anything.

A family lives in one module, which holds its math, its modules and one `TTTFamily` object
named `FAMILY`: how its config section is parsed, how it attaches to a moshi model, which
checkpoint tensors it requires, accepts and ignores, and how `make-tiny` writes a fine-tune in
the layout its training code uses. Adding a family means writing that module, adding one line
to `FAMILY_MODULES`, and its tests.
"""

from __future__ import annotations

import abc
import importlib
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

if tp.TYPE_CHECKING:
    import torch
    from torch import nn

    from .base import FastWeightModule

# name -> module holding `FAMILY`. Order matters only for listings.
FAMILY_MODULES: dict[str, str] = {
    "inplace": "moshi_ttt.ttt.inplace",
    "ttt-mlp": "moshi_ttt.ttt.mlp",
}
FAMILY_NAMES = tuple(FAMILY_MODULES)


@dataclass(frozen=True)
class SectionLayout:
    """Where a TTT section was found, and the defaults that layout implies.

    The same key means different things in different research layouts (e.g. a moshi_in_place
    `ttt_config` without `delta_clip_fro_norm` was clipped at 1e-5 by its training code, and the
    moshi-finetune TTT-MLP code never applied `post_norm`/`wo`); families read those defaults
    from `defaults` instead of guessing the layout themselves.
    """

    file: Path
    key: str  # the section's key in `file`
    default_family: str  # the family a section without family-specific keys belongs to
    defaults: tp.Mapping[str, tp.Any] = field(default_factory=dict)


class TTTFamily(abc.ABC):
    """One TTT family: everything the loader, `inspect` and `make-tiny` need to know about it."""

    name: tp.ClassVar[str]
    # Keys that only this family's sections carry: a section without `variant` is recognised by them.
    marker_keys: tp.ClassVar[tuple[str, ...]]
    # make-tiny: the TTT section it writes (tiny 4-layer model) and the random scale of the tensors.
    tiny_section: tp.ClassVar[dict[str, tp.Any]]
    tiny_std: tp.ClassVar[float]

    @abc.abstractmethod
    def parse(self, section: dict, layers: list[int], source: Path, layout: SectionLayout) -> tp.Any:
        """The family's config dataclass from a section whose layers are already resolved."""

    @abc.abstractmethod
    def chunk_size(self, config: tp.Any) -> int:
        """Tokens per fast-weight update (chunk or mini-batch)."""

    @abc.abstractmethod
    def attach(self, lm: nn.Module, config: tp.Any) -> list[FastWeightModule]:
        """Turn the configured layers of a loaded moshi LM into TTT layers (weights still to load)."""

    def optional_keys(self, config: tp.Any) -> tuple[str, ...]:
        """Substrings of parameter names a checkpoint may lack because the config never uses them."""
        return ()

    def ignored_keys(self, config: tp.Any) -> tuple[str, ...]:
        """Prefixes of tensors real checkpoints carry that inference never uses."""
        return ()

    @abc.abstractmethod
    def owns_key(self, key_in_layer: str) -> bool:
        """Whether a tensor name (after `transformer.layers.{i}.`) belongs to this family's layer."""

    @abc.abstractmethod
    def write_tiny_config(self, folder: Path, lm_config: dict, section: dict, run_dir: Path, seed: int) -> None:
        """Write the fine-tune's config file(s) into `folder` the way its training code does."""

    def tiny_tensor(self, name: str, shape: tuple[int, ...], section: dict, generator: torch.Generator) -> torch.Tensor:
        """A random value for one fine-tune tensor of make-tiny's checkpoint."""
        import torch

        return torch.randn(shape, generator=generator) * self.tiny_std


def family(name: str) -> TTTFamily:
    """The family called `name` (imports its module, hence torch and moshi)."""
    try:
        module = FAMILY_MODULES[name]
    except KeyError:
        raise KeyError(f"unknown TTT family {name!r}; expected one of {', '.join(FAMILY_NAMES)}") from None
    return importlib.import_module(module).FAMILY


def family_of(config: tp.Any) -> TTTFamily:
    """The family a parsed config belongs to (configs carry their family's name as `variant`)."""
    return family(config.variant)
