"""Speed options against the default float32 step on one fixed batch: --fused-copies changes only
how BatchNorm batches the copies; --amp bf16 (now also on CPUs) stays close to float32."""
import torch

from laplacedrl import config as C
from laplacedrl.data.datasets import DatasetSpec
from laplacedrl.drl.models import DRLModels, make_sde
from laplacedrl.engine.run import Precision

CPU = torch.device("cpu")
SPEC = DatasetSpec("d", 10, 1, 8, (0.5,), (0.5,), 1, False)


def loss_and_grads(amp: str):
    cfg = C.resolve(C.DRLConfig, {"dataset": "digits", "arch": "wrn-10-1", "dropout": "0"})
    torch.manual_seed(0)
    models = DRLModels(cfg, SPEC, make_sde(cfg)).train()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.rand(16, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    torch.manual_seed(3)                                       # the objective's noise
    with Precision(amp, CPU).autocast():
        loss = models(x, t)["loss"]
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in models.parameters() if p.grad is not None])
    return float(loss.detach()), grads


def test_bf16_on_the_cpu_keeps_the_pretraining_loss_and_gradients_close_to_float32():
    ref_loss, ref = loss_and_grads("off")
    loss, grads = loss_and_grads("bf16")
    assert abs(loss - ref_loss) < 0.02 * abs(ref_loss)
    assert torch.nn.functional.cosine_similarity(grads, ref, dim=0) > 0.99
    assert torch.linalg.vector_norm(grads - ref) < 0.1 * torch.linalg.vector_norm(ref)
    again, _ = loss_and_grads("off")
    assert again == ref_loss                                   # the float32 reference is exact
