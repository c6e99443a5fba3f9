"""Fuse the factor pairs that read the same input (q/k/v, gate/up): one product with the stacked `W_v` instead of
one per pair.

Low rank turns each of a LLaMA block's 7 matmuls into 2. Siblings that read the same tensor can share their first
product, `x [W_v,q; W_v,k; W_v,v]^T`, and each take their slice of it: 11 calls per block instead of 14, with the
same arithmetic and bytes. Where per-call costs matter (kernel launches on a GPU) that may pay; on this project's
CPU it measured no gain (README, "Inference speed and memory": each matmul costs what its bytes cost there).

Runtime only. `fuse_shared_inputs(model)` finds the siblings by running one token through the model, stacks their
`W_v` into one tensor (their own are freed: no memory is added) and gives each a `StemSlice` in place of its `v`
linear; the slice remembers the last input (by identity and version) so the second and third sibling reuse the
first one's product. `unfuse_shared_inputs(model)` restores the separate `v` linears with bit-identical weights.
`svdkit.save` refuses a fused model (its state dict names differ): unfuse first.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .modules import LowRankLinear
from .statistics import shared_inputs

log = logging.getLogger(__name__)


class Stem(nn.Module):
    """The stacked `W_v` of sibling pairs (`sum of ranks x in`) and the last product it computed."""

    def __init__(self, weight: torch.Tensor, users: int, requires_grad: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=requires_grad)
        self.users = users
        self._forget()

    def _forget(self) -> None:
        self._input: weakref.ref | None = None
        self._version = -1
        self._product: torch.Tensor | None = None
        self._left = 0

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """`x W^T`, computed once for the siblings that pass the same (unmodified) tensor, then forgotten.

        Tensors made under `torch.inference_mode` carry no version counter: for them only identity is checked."""
        version = -1 if x.is_inference() else x._version
        if self._input is None or self._input() is not x or self._version != version or self._left == 0:
            self._product = F.linear(x, self.weight)
            self._input, self._version, self._left = weakref.ref(x), version, self.users
        out = self._product
        self._left -= 1
        if self._left == 0:  # every sibling has read it: do not hold an activation between steps
            self._forget()
        return out


class StemSlice(nn.Module):
    """Stands in for a sibling's `v` linear: its rows `[start, stop)` of the stem's product."""

    def __init__(self, stem: Stem, start: int, stop: int) -> None:
        super().__init__()
        self.stem, self.start, self.stop = stem, start, stop
        self.in_features, self.out_features = stem.weight.shape[1], stop - start

    @property
    def weight(self) -> torch.Tensor:
        """This sibling's `W_v` (a view of the stem's rows)."""
        return self.stem.weight[self.start : self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem.product(x)[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"rows={self.start}:{self.stop} of {self.stem.weight.shape[0]}"


def _plain(layer: nn.Module) -> bool:
    """A `LowRankLinear` whose `v` is an unfused, unquantized, bias-free `nn.Linear`."""
    return (isinstance(layer, LowRankLinear) and type(layer.v) is nn.Linear and layer.v.bias is None
            and type(layer.v.weight) is nn.Parameter)


def sibling_groups(model: nn.Module) -> list[list[str]]:
    """Names of the low-rank linears that receive the same input tensor, in groups of two or more, found by one
    token through the model (q/k/v and gate/up in LLaMA-style blocks)."""
    layers = {name: m for name, m in model.named_modules() if _plain(m)}
    device = next(model.parameters()).device
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        reps = shared_inputs(layers, lambda: model(input_ids=ids, use_cache=False))
    groups: dict[str, list[str]] = {}
    for name, rep in reps.items():
        groups.setdefault(rep, []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def fuse_shared_inputs(model: nn.Module) -> int:
    """Give each group of sibling pairs one stacked `W_v` (see the module docstring); returns the groups fused."""
    if is_fused(model):
        raise ValueError("the model is fused already")
    groups = sibling_groups(model)
    for names in groups:
        layers = [model.get_submodule(n) for n in names]
        stem = Stem(torch.cat([m.v.weight.detach() for m in layers]), len(layers), layers[0].v.weight.requires_grad)
        start = 0
        for m in layers:
            m.v = StemSlice(stem, start, start + m.rank)
            start += m.rank
    log.info("fused %d groups of low-rank pairs that share an input", len(groups))
    return len(groups)


def unfuse_shared_inputs(model: nn.Module) -> int:
    """Put back each sibling's own `v` linear (weights bit-identical to before fusing); returns the pairs restored."""
    count = 0
    for m in model.modules():
        if isinstance(m, LowRankLinear) and isinstance(m.v, StemSlice):
            v = nn.Linear(m.in_features, m.rank, bias=False, device="meta")
            v.weight = nn.Parameter(m.v.weight.detach().clone(), requires_grad=m.v.stem.weight.requires_grad)
            m.v = v
            count += 1
    return count


def is_fused(model: nn.Module) -> bool:
    """True when some low-rank pair of `model` reads a shared stem."""
    return any(isinstance(m, StemSlice) for m in model.modules())
