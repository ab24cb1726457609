"""Which modules get compressed.

Default targets (docs/design.md §2) are every linear projection inside the repeated
transformer blocks. Blocks are found generically as the largest ``nn.ModuleList``
of identical modules, so Llama, OPT, GPT-2, BERT and most other Hugging Face
architectures work without a per-architecture table; embeddings, LM heads,
poolers and classifier heads live outside the blocks and are never targets.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .errors import RanklmError

try:  # GPT-2 style Conv1D (weight stored in x out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers always has it
    Conv1D = ()  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class Target:
    """One matrix to compress: ``out_features x in_features`` in torch layout."""

    name: str
    out_features: int
    in_features: int
    kind: str  # "linear" or "conv1d"
    block: int  # index of the transformer block it belongs to

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``out x in`` whatever the module stores (Conv1D is in x out)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.t()
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The repeated transformer blocks: the largest ModuleList of same-type modules holding linears."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(is_linear_like(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > sum(p.numel() for p in best[1].parameters()):
            best = (name, module)
    return best


def check_patterns(patterns: list[str] | None, flag: str) -> None:
    """Refuse a ``re:`` pattern that is not a regular expression (one line, before any work)."""
    for pattern in patterns or []:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise RanklmError(f"{flag} {pattern!r} is not a valid regular expression: {e}") from None


def _matches(name: str, pattern: str) -> bool:
    """Glob on the full name or any dotted suffix; ``re:`` prefix for a regex."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def find_targets(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[Target]:
    """Target matrices in module order, filtered by include/exclude patterns."""
    check_patterns(include, "--include")
    check_patterns(exclude, "--exclude")
    found = find_blocks(model)
    if found is None:
        kinds = Counter(type(m).__name__ for m in model.modules() if len(list(m.children())) == 0)
        raise RanklmError(
            "model has no compressible layers: no repeated transformer blocks with linear layers were found "
            f"(leaf module types: {', '.join(f'{k} x{v}' for k, v in kinds.most_common(8)) or 'none'})"
        )
    prefix, blocks = found
    targets: list[Target] = []
    for b, block in enumerate(blocks):
        for sub, module in block.named_modules():
            if not is_linear_like(module):
                continue
            name = f"{prefix}.{b}.{sub}" if prefix else f"{b}.{sub}"
            w = weight_matrix(module)
            kind = "linear" if isinstance(module, nn.Linear) else "conv1d"
            targets.append(Target(name, int(w.shape[0]), int(w.shape[1]), kind, b))
    if include:
        unmatched = [p for p in include if not any(_matches(t.name, p) for t in targets)]
        if unmatched:
            raise RanklmError(f"--include pattern(s) {unmatched} match no target module (e.g. {targets[0].name})")
        targets = [t for t in targets if any(_matches(t.name, p) for p in include)]
    if exclude:
        unmatched = [p for p in exclude if not any(_matches(t.name, p) for t in targets)]
        if unmatched:
            raise RanklmError(f"--exclude pattern(s) {unmatched} match no target module")
        targets = [t for t in targets if not any(_matches(t.name, p) for p in exclude)]
    if not targets:
        raise RanklmError("the include/exclude patterns leave no module to compress")
    return targets
