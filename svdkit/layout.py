"""The parts of a model the engine works on, found structurally once: the decoder blocks, each block's
compressible linears, their shapes and full module names; and the two module helpers every layer uses.

A leaf module: it imports torch only (transformers is touched inside `is_linear`, to recognise GPT-2's
`Conv1D`), so the pure math and the layers above can all use it without import cycles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import SvdkitError


class ModelError(SvdkitError, ValueError):
    """Raised for unknown models, unreachable hub ids and unsupported architectures."""


def num_layers(config) -> int:
    """The number of decoder blocks a config declares."""
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise ModelError(f"config of type {type(config).__name__} names no number of hidden layers")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the one ModuleList with exactly `num_hidden_layers` entries, and its dotted name."""
    n = num_layers(model.config)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        names = [name for name, _ in found]
        raise ModelError(
            f"unsupported architecture {type(model).__name__}: expected one ModuleList of {n} decoder blocks, "
            f"found {len(found)} ({names})"
        )
    return found[0]


def is_linear(module: nn.Module) -> bool:
    """A dense matrix the engine can factorize: `nn.Linear` or transformers' GPT-2 `Conv1D`."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The compressible matrices of one block, by their dotted name inside the block."""
    found = {name: m for name, m in block.named_modules() if name and is_linear(m)}
    if not found:
        raise ModelError(f"decoder block {type(block).__name__} has no nn.Linear or Conv1D to compress")
    return found


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The `out x in` weight of a linear; GPT-2's Conv1D stores it transposed."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` of `root` by `new`."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


@dataclass(frozen=True)
class Layout:
    """A model's decoder structure as data, computed once (from the dense model, meta device included) and
    passed down: where the blocks are, which linears each has, their `out x in` shapes."""

    prefix: str
    linears: tuple[dict[str, tuple[int, int]], ...]  # per block: dotted name inside the block -> (m, n)

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        prefix, blocks = find_blocks(model)  # a block without float linears (all quantized) has an empty entry
        return cls(prefix, tuple({name: tuple(weight_matrix(m).shape) for name, m in b.named_modules()
                                  if name and is_linear(m)} for b in blocks))

    @property
    def n_blocks(self) -> int:
        return len(self.linears)

    def full(self, i: int, name: str) -> str:
        """The full module name of linear `name` of block `i`, e.g. `model.layers.3.self_attn.q_proj`."""
        return f"{self.prefix}.{i}.{name}"

    def output_linear(self, i: int) -> str:
        """The linear of block `i` that writes the block's output: the last (in module order) whose output width
        is the hidden size the block's first linear reads, an MLP's down projection. The loss gradient at its
        output is the loss gradient at the block's output (the residual sum passes it on unchanged)."""
        linears = list(self.linears[i].items())
        if not linears:
            raise ValueError(f"block {i} has no linear layers")
        hidden = linears[0][1][1]
        writers = [name for name, (m, _) in linears if m == hidden]
        if not writers:
            raise ValueError(f"block {i} has no linear writing the hidden size {hidden}")
        return writers[-1]

    def block_prefix(self, i: int) -> str:
        """The state-dict prefix of block `i`'s tensors, with its trailing dot."""
        return f"{self.prefix}.{i}."

    def matrices(self) -> dict[str, tuple[int, int]]:
        """Every decoder-block linear: full name -> (m, n), in block order."""
        return {self.full(i, name): shape for i, block in enumerate(self.linears) for name, shape in block.items()}

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The model's block list (the module at `prefix`)."""
        return model.get_submodule(self.prefix)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts (meta tensors included): all unique tensors, and those inside the decoder blocks' linears."""
    total = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights
    _, blocks = find_blocks(model)
    linear = 0
    for block in blocks:
        for m in block.modules():
            if is_linear(m):  # a LowRankLinear counts through its two nn.Linear children
                linear += sum(p.numel() for p in m.parameters(recurse=False))
    return {"total": total, "block_linears": linear}
