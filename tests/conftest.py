from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_progress_env(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    yield

import sys  # noqa: E402
sys.path.insert(0, str(ROOT))  # the CLIs (train_ssl.py, pretrain_drl.py) live at the repo root
