import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

from workbench.models.policy import ModelConfig  # noqa: E402

TINY = ModelConfig(n_layer=1, n_embd=16, n_head=2)


@pytest.fixture
def tiny_model_cfg():
    return TINY
