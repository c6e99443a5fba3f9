"""A causal LM whose matrices named in `config.svdkit["ranks"]` are stored as low-rank pairs `W = W_u W_v`.

svdkit copies this file into each compressed folder written with `format="transformers"` (as
`modeling_svdkit.py`, with the import lines below naming the compressed model's own architecture), so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` builds the low-rank model with plain
transformers: it subclasses the original `*ForCausalLM`, swaps each named `nn.Linear` for a `LowRankLinear`
before the weights load, and leaves everything else (attention through transformers' attention interface,
the KV cache, generation) to the original class. It needs only torch and transformers, not svdkit.

`AutoModel` builds the base model (`SvdkitModel`, the original `*Model` with the same swap): that is what
vLLM's Transformers backend loads (it adds its own head and attention), and the config's
`base_model_tp_plan` shards the pairs for its tensor parallelism: a column-wise matrix splits `W_u`'s rows,
a row-wise one `W_v`'s columns, and the other factor stays whole on every rank.
"""


import torch
from torch import nn

# The architecture this folder extends (svdkit writes these three lines for the compressed model).
from transformers import LlamaConfig as BaseConfig
from transformers import LlamaForCausalLM as BaseForCausalLM
from transformers import LlamaModel as BaseModel

PREFIX = BaseForCausalLM.base_model_prefix + "."  # the base model's place in the causal LM ("model.")


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


def low_rank_tp_plan(plan: dict, ranks: dict, layers: int) -> dict:
    """The base model's tensor-parallel plan with each low-rank pair in place of its dense matrix: `colwise`
    shards the outputs of `W_u` (`W_v` whole), `rowwise` the inputs of `W_v` (`W_u` whole, after the reduction);
    a matrix left dense keeps its style. Names are relative to the base model, one entry per layer."""
    low = {name[len(PREFIX):] for name in ranks if name.startswith(PREFIX)}
    out = {}
    for pattern, style in plan.items():
        if pattern.count("*") != 1:
            out[pattern] = style
            continue
        for i in range(layers):
            name = pattern.replace("*", str(i))
            if name not in low:
                out[name] = style
            elif style in ("colwise", "rowwise"):  # any other style leaves the pair replicated
                out[f"{name}.u" if style == "colwise" else f"{name}.v"] = style
    return out


class SvdkitConfig(BaseConfig):
    """The original configuration under its own model type, so that transformers never loads this folder as the
    dense architecture (whose weights it does not hold) without running this file; its tensor-parallel plan
    names the low-rank pairs."""

    model_type = "svdkit_" + BaseConfig.model_type

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        ranks = (getattr(self, "svdkit", None) or {}).get("ranks", {})
        base_plan = BaseConfig.base_model_tp_plan or {}
        if base_plan:
            self.base_model_tp_plan = low_rank_tp_plan(base_plan, ranks, self.num_hidden_layers)


def swap_low_rank(module: nn.Module, ranks: dict, prefix: str) -> None:
    """Replace each matrix of the rank map under `prefix` (names relative to the causal LM) by a `LowRankLinear`."""
    for name, rank in ranks.items():
        if not name.startswith(prefix):
            continue
        local = name[len(prefix):]
        dense = module.get_submodule(local)
        parent, _, child = local.rpartition(".")
        low = LowRankLinear(dense.in_features, dense.out_features, rank, dense.bias is not None,
                            dense.weight.device, dense.weight.dtype)
        setattr(module.get_submodule(parent) if parent else module, child, low)


class _LaidOut:
    """`from_pretrained` as transformers does it, then the fast `W_u` layout again (loading assigns row-major)."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a pair
        for module in model.modules():
            if isinstance(module, LowRankLinear):
                module.lay_out()
        return loaded


class SvdkitModel(_LaidOut, BaseModel):
    """The original base model (blocks, no head) with the low-rank matrices of the rank map swapped in: what
    `AutoModel` builds, and what vLLM's Transformers backend serves."""

    config_class = SvdkitConfig
    _supports_attention_backend = True  # attention goes through transformers' interface, kwargs passed down

    def __init__(self, config: SvdkitConfig) -> None:
        super().__init__(config)
        swap_low_rank(self, config.svdkit["ranks"], PREFIX)


class SvdkitForCausalLM(_LaidOut, BaseForCausalLM):
    """The original causal LM with the low-rank matrices of the rank map swapped in."""

    config_class = SvdkitConfig
    _supports_attention_backend = True

    def __init__(self, config: SvdkitConfig) -> None:
        super().__init__(config)
        swap_low_rank(self, config.svdkit["ranks"], "")
