"""FWSVD's Fisher sums, computed block by block, equal a per-window autograd pass through the whole model."""

import pytest
import torch
from conftest import tiny_model

from svdkit.blocks import Blocks
from svdkit.gradients import fisher_row_importance
from svdkit.layout import Layout, weight_matrix


def brute_force_fisher(model, calib):
    """sum over windows of the squared gradient of that window's mean next-token loss, row sums per linear."""
    layout = Layout.of(model)
    blocks = layout.blocks(model)
    out = {layout.full(i, n): 0.0 for i, b in enumerate(layout.linears) for n in b}
    for w in range(calib.shape[0]):
        ids = calib[w : w + 1]
        model.zero_grad()
        model(ids, labels=ids, use_cache=False).loss.backward()
        for i, names in enumerate(layout.linears):
            for n in names:
                m = blocks[i].get_submodule(n)
                g = m.weight.grad if isinstance(m, torch.nn.Linear) else m.weight.grad.t()
                out[layout.full(i, n)] = out[layout.full(i, n)] + (g.double() ** 2).sum(dim=1)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_blockwise_fisher_equals_per_window_autograd(arch):
    model = tiny_model(arch)
    calib = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(0))
    ref = brute_force_fisher(model, calib)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = fisher_row_importance(Blocks(model), calib, chunk=2, progress=False)  # 3 rounds of 2, 2 and 1 windows
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].shape == (weight_matrix(model.get_submodule(k)).shape[0],)
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-12 * float(ref[k].max()))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    sub = fisher_row_importance(Blocks(model), calib, windows=2, progress=False)
    ref2 = brute_force_fisher(model, calib[:2])
    for k in ref2:  # `windows` uses the first windows only
        torch.testing.assert_close(sub[k], ref2[k], rtol=1e-4, atol=1e-12 * float(ref2[k].max()))
