"""The LaplaceNet step's pieces against plain references: one forward pass per augmented copy."""
import copy

import pytest
import torch
import torch.nn.functional as F

from laplacedrl.engine.run import Precision
from laplacedrl.models import build_model
from laplacedrl.ssl.epoch import train_epoch

CPU = torch.device("cpu")


def one_step(model, x, y, fused):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(x, y, torch.ones(len(y)), len(y))]
    return train_epoch(model, opt, batches, 1, lambda step: 0.1, CPU, Precision("off", CPU),
                       lambda v, n_lab: v, fused_copies=fused)[0]


def test_copies_run_one_forward_pass_each_as_published():
    """After one step on 3 copies, every BatchNorm's running statistics are those of a reference loop
    that runs one forward pass per copy, and the loss is the mean of the copies' losses."""
    torch.manual_seed(0)
    model = build_model("wrn-10-1", 10, 1, 8)
    ref = copy.deepcopy(model).train()
    x = torch.randn(6, 3, 1, 8, 8)                                    # (B, A, C, H, W)
    y = torch.randint(0, 10, (6,))
    loss = one_step(model, x, y, fused=False)
    per_copy = [F.cross_entropy(ref(x[:, j])[0].double(), y) for j in range(3)]
    assert float(loss) == pytest.approx(float(sum(per_copy).detach()) / 3, rel=1e-6)
    bns = [(n, b) for n, b in model.named_buffers() if "running" in n]
    assert len(bns) >= 10
    for (name, ours), theirs in zip(bns, [b for n, b in ref.named_buffers() if "running" in n]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)

    torch.manual_seed(0)
    other = build_model("wrn-10-1", 10, 1, 8)
    one_step(other, x, y, fused=True)                                # the named option differs
    assert not torch.allclose(other.bn_out.running_var, model.bn_out.running_var)
