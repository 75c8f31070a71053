"""Memory telemetry against a direct computation on a known stream of reads."""

import math

import pytest
import torch

from titanmem.eval.telemetry import MemoryTelemetry


def test_telemetry_matches_a_direct_computation():
    n, knn = 200, 2
    telemetry = MemoryTelemetry(n, ["layer1", "layer3"], torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    # Window 1: layer1 reads rows 0..99 with a skew towards low rows; layer3 reads only rows 0..9.
    reads = {
        "layer1": (torch.randint(0, 100, (37, 4), generator=generator) ** 2 // 100,
                   torch.softmax(torch.randn(37, 4, generator=generator), -1)),
        "layer3": (torch.randint(0, 10, (21, 4), generator=generator),
                   torch.softmax(torch.randn(21, 4, generator=generator), -1)),
    }
    for layer, (indices, weights) in reads.items():
        telemetry.observe(layer, indices, weights, knn)
    scalars, histograms = telemetry.summarize()

    def expected(indices_list, weights_list, ever):
        counts = torch.bincount(torch.cat([i.flatten() for i in indices_list]), minlength=n).double()
        p = counts / counts.sum()
        nonzero = p[p > 0]
        entropy = -(nonzero * nonzero.log()).sum().item()
        top = counts.sort(descending=True).values[: math.ceil(n / 100)].sum().item()
        top1 = torch.cat([w.double().unflatten(-1, (-1, knn)).amax(-1).flatten() for w in weights_list]).mean().item()
        return {"hit_fraction": (counts > 0).double().mean().item(), "never_hit_fraction": 1 - len(ever) / n,
                "entropy": entropy, "kl_to_uniform": math.log(n) - entropy, "hottest_1pct_hits": top,
                "hottest_1pct_share": top / counts.sum().item(), "top1_weight": top1}

    for name, (indices, weights) in reads.items():
        want = expected([indices], [weights], set(indices.flatten().tolist()))
        for metric, value in want.items():
            assert scalars[f"memory/{name}/{metric}"] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, metric)
    pool = expected([r[0] for r in reads.values()], [r[1] for r in reads.values()],
                    set(torch.cat([r[0].flatten() for r in reads.values()]).tolist()))
    for metric, value in pool.items():
        assert scalars[f"memory/pool/{metric}"] == pytest.approx(value, rel=1e-9, abs=1e-12), metric
    assert histograms["memory/layer3/log10_hits"].shape == (n,)

    # Window 2: only layer3 reads, rows 150..151. The window restarts; "never hit" keeps the whole history.
    indices = torch.tensor([[150, 151], [150, 150]])
    telemetry.observe("layer3", indices, torch.tensor([[0.9, 0.1], [0.5, 0.5]]), knn)
    scalars, _ = telemetry.summarize()
    assert scalars["memory/layer3/hit_fraction"] == pytest.approx(2 / n)
    ever3 = set(reads["layer3"][0].flatten().tolist()) | {150, 151}
    assert scalars["memory/layer3/never_hit_fraction"] == pytest.approx(1 - len(ever3) / n)
    assert scalars["memory/layer3/top1_weight"] == pytest.approx(0.7)
    assert scalars["memory/layer3/hottest_1pct_hits"] == 4  # ceil(200 / 100) = 2 rows: 150 (3 reads) + 151 (1)
    assert "memory/layer1/hit_fraction" not in scalars  # no reads in this window: nothing to report


def test_a_training_run_writes_memory_telemetry_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers import make_config
    from titanmem.train import Trainer

    config = make_config(tmp_path, training={"steps": 2, "seq_len": 32, "local_batch_size": 2},
                         memory={"enabled": True}, metrics={"enable_tensorboard": True, "memory_telemetry_freq": 1})
    trainer = Trainer(config)
    trainer.train()
    trainer.close()
    (run,) = (tmp_path / "tb").iterdir()
    events = EventAccumulator(str(run), size_guidance={"histograms": 0}).Reload()
    tags = events.Tags()
    for name in ("layer1", "layer3", "layer5", "pool"):
        for metric in ("hit_fraction", "never_hit_fraction", "entropy", "kl_to_uniform", "top1_weight",
                       "hottest_1pct_hits", "hottest_1pct_share"):
            assert f"memory/{name}/{metric}" in tags["scalars"]
    assert "memory/pool/log10_hits" in tags["histograms"]
    assert [e.step for e in events.Scalars("memory/pool/hit_fraction")] == [1, 2]


def test_the_default_run_reports_memory_telemetry():
    from titanmem.config import build_config

    config, _ = build_config(["--job.config_file", "train_configs/debug_model.toml"])
    assert config.memory.enabled and config.metrics.enable_tensorboard
    assert 0 < config.metrics.memory_telemetry_freq <= config.training.steps
