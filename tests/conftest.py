import os

# Offline by construction: a test that reaches for the hub fails fast instead of retrying for 20 s.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Triton kernels run under its interpreter on a CPU-only host; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from titanmem.config import JobConfig  # noqa: E402


def make_config(dump_folder, **sections) -> JobConfig:
    """A small CPU run on the bundled corpus; `sections` maps a section name to field overrides."""
    config = JobConfig()
    config.job.dump_folder = str(dump_folder)
    config.training.steps = 20
    config.training.seq_len = 64
    config.training.local_batch_size = 4
    config.training.device = "cpu"
    config.optimizer.lr = 3e-3
    config.lr_scheduler.warmup_steps = 4
    config.metrics.log_freq = 5
    config.metrics.enable_tensorboard = False
    config.checkpoint.enable = False
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config


@pytest.fixture
def small_config(tmp_path):
    return lambda **sections: make_config(tmp_path / "run", **sections)
