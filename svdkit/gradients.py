"""Fisher information of the decoder-block linears, for FWSVD: squared gradients of the LM loss."""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import block_linears, find_blocks, is_linear

log = logging.getLogger(__name__)


@torch.enable_grad()
def fisher_row_importance(
    model: nn.Module, calib: torch.Tensor, samples: int | None = None, progress: bool = True
) -> dict[str, torch.Tensor]:
    """`I_i = sum over windows of sum_j (dL/dW_ij)^2` for every block linear (rows = outputs), float64.

    One forward and backward pass per calibration window (per-sample gradients, as the Fisher needs);
    the whole model must fit on its device for this pass.
    """
    prefix, blocks = find_blocks(model)
    targets = {f"{prefix}.{i}.{name}": m for i, block in enumerate(blocks) for name, m in block_linears(block).items()}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    importance = {name: torch.zeros(_out_features(m), dtype=torch.float64) for name, m in targets.items()}
    device = next(model.parameters()).device
    windows = calib if samples is None else calib[:samples]
    try:
        for i in tqdm(range(windows.shape[0]), desc="fisher", unit="window", disable=not progress):
            ids = windows[i : i + 1].to(device)
            loss = model(ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise ArithmeticError(f"non-finite calibration loss on window {i}")
            loss.backward()
            for name, m in targets.items():
                g = m.weight.grad if isinstance(m, nn.Linear) else m.weight.grad.t()
                importance[name] += (g.double() ** 2).sum(dim=1).cpu()
                m.weight.grad = None
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return importance


def _out_features(m: nn.Module) -> int:
    assert is_linear(m)
    return m.weight.shape[0] if isinstance(m, nn.Linear) else m.weight.shape[1]
