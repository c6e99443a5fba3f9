"""`LowRankLinear`: a linear layer stored as two factors, `y = W_u (W_v x) + b`.

`W_u` is kept in memory transposed (column-major: `u.weight` is an `out x rank` view of a contiguous `rank x out`
tensor). At batch 1 a decode step multiplies one token by `W_u`, and MKL's matrix-vector product streams the long
rows of `W_u^T` much faster than the short (`rank`-long) rows of `W_u`: 1.3-2x per layer on SmolLM2 shapes
(`benchmarks/lowrank_linear.py`, layout column). Shapes, the state dict and saved files are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .linalg import NumericalError


class LowRankLinear(nn.Module):
    """Drop-in for `nn.Linear(in_features, out_features)` holding `W_u` (out x rank) and `W_v` (rank x in).

    The factors are two real `nn.Linear` children (`v` then `u`, bias on `u`), so every tool that
    understands linears (quantizers, LoRA, `torch.compile`) sees ordinary modules.
    """

    is_low_rank = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        column_major(self.u)
        self.register_load_state_dict_post_hook(_lay_out_after_load)

    @classmethod
    def from_factors(cls, w_u: torch.Tensor, w_v: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """Build from `W_u` (out x rank) and `W_v` (rank x in); dtype and device follow `w_u`."""
        out_features, rank = w_u.shape
        if w_v.shape[0] != rank:
            raise ValueError(f"factor shapes do not chain: W_u {tuple(w_u.shape)}, W_v {tuple(w_v.shape)}")
        layer = cls(w_v.shape[1], out_features, rank, bias=bias is not None, device="meta")
        layer.u.weight = nn.Parameter(w_u.detach().t().contiguous().t())
        layer.v.weight = nn.Parameter(w_v.detach().to(w_u).contiguous())
        if bias is not None:
            layer.u.bias = nn.Parameter(bias.detach().to(w_u).contiguous())
        return layer

    @classmethod
    def from_float64(cls, w_u: torch.Tensor, w_v: torch.Tensor, bias: torch.Tensor | None, storage: torch.dtype,
                     device: torch.device, compute: torch.dtype, what: str = "matrix") -> LowRankLinear:
        """From float64 factors: cast to the `storage` dtype (what is saved) and checked finite after the cast (a
        half-precision overflow is an error, not a silent inf), then put on `device` in the `compute` dtype."""
        w_u, w_v = w_u.to(storage), w_v.to(storage)
        for t, part in ((w_u, "W_u"), (w_v, "W_v")):
            if not torch.isfinite(t).all():
                raise NumericalError(f"{part} of {what} has non-finite values in {storage} (overflow in the cast)")
        b = bias.detach().to(storage) if bias is not None else None
        return cls.from_factors(w_u, w_v, b).to(device, compute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense `out x in` product `W_u W_v` (computed on demand, for inspection and dense export)."""
        return self.u.weight @ self.v.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.u.bias

    def to_linear(self) -> nn.Linear:
        """The equivalent dense `nn.Linear` (factors multiplied back)."""
        w = self.weight
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        dense.weight = nn.Parameter(w.detach().clone())
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().clone())
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def column_major(linear: nn.Module) -> None:
    """Store an `nn.Linear`'s weight transposed in memory (same shape and values), the fast layout for `W_u`.

    Other modules (a quantized factor, an adapter wrapper) are left as they are."""
    w = getattr(linear, "weight", None) if isinstance(linear, nn.Linear) else None
    if isinstance(w, nn.Parameter) and w.dim() == 2 and w.stride() != (1, w.shape[0]):
        linear.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)


def _lay_out_after_load(module: LowRankLinear, incompatible_keys) -> None:
    """`load_state_dict(..., assign=True)` replaces `u.weight` by the (row-major) saved tensor: lay it out again."""
    column_major(module.u)
