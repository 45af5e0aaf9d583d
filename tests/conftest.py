import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when DataLoader workers run beside it.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One materialised copy of the built-in digits for the whole session."""
    return str(tmp_path_factory.mktemp("fastft-cache"))


def tiny_overrides(out_dir, cache, **extra) -> list[str]:
    """A config small enough for a CPU test: ResNet-18 small stem at 8x8, a few steps per epoch."""
    base = {
        "data.cache_dir": cache, "data.image_size": 8, "loader.batch_size": 16, "loader.workers": 0,
        "model.arch": "resnet18", "model.small_stem": True, "model.queue_size": 40, "model.momentum": 0.9,
        "optim.epochs": 2, "optim.lr": 0.06, "run.steps_per_epoch": 3, "run.out_dir": str(out_dir),
        "run.device": "cpu", "run.progress": False, "run.tensorboard": False, "knn.every": 0, "run.log_every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
