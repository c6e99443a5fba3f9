"""A causal LM whose matrices named in `config.svdkit["ranks"]` are stored as low-rank pairs `W = W_u W_v`.

svdkit copies this file into each compressed folder written with `format="transformers"` (as
`modeling_svdkit.py`, with the import lines below naming the compressed model's own architecture), so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` builds the low-rank model with plain
transformers: it subclasses the original `*ForCausalLM`, swaps each named `nn.Linear` for a `LowRankLinear`
before the weights load, and leaves everything else (attention through transformers' attention interface,
the KV cache, generation) to the original class. It needs only torch and transformers, not svdkit.
"""

import torch
from torch import nn

# The architecture this folder extends (svdkit writes these two lines for the compressed model).
from transformers import LlamaConfig as BaseConfig
from transformers import LlamaForCausalLM as BaseForCausalLM


class LowRankLinear(nn.Module):
    """`y = W_u (W_v x) + b`: `v` (rank x in) then `u` (out x rank, with the bias), two ordinary `nn.Linear`s."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self.lay_out()

    def lay_out(self) -> None:
        """Keep `W_u` transposed in memory: a one-token (decode) product then streams long rows, faster on CPUs."""
        w = self.u.weight
        if w.stride() != (1, w.shape[0]):
            self.u.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))


class SvdkitConfig(BaseConfig):
    """The original configuration under its own model type, so that transformers never loads this folder as the
    dense architecture (whose weights it does not hold) without running this file."""

    model_type = "svdkit_" + BaseConfig.model_type


class SvdkitForCausalLM(BaseForCausalLM):
    """The original causal LM with the low-rank matrices of the rank map swapped in."""

    config_class = SvdkitConfig

    def __init__(self, config: SvdkitConfig) -> None:
        super().__init__(config)
        for name, rank in config.svdkit["ranks"].items():
            dense = self.get_submodule(name)
            parent, _, child = name.rpartition(".")
            low = LowRankLinear(dense.in_features, dense.out_features, rank, dense.bias is not None,
                                dense.weight.device, dense.weight.dtype)
            setattr(self.get_submodule(parent), child, low)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load as transformers does, then restore the fast `W_u` layout (loading assigns row-major tensors)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a pair
        for module in model.modules():
            if isinstance(module, LowRankLinear):
                module.lay_out()
        return loaded
