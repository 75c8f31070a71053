import pytest
import torch

from titanmem.components import metrics as metrics_module
from titanmem.components.metrics import MetricsLogger, bf16_peak_flops
from titanmem.config.sections import Metrics


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_throughput_eta_and_mfu_arithmetic(monkeypatch, tmp_path):
    clock = FakeClock()
    monkeypatch.setattr(metrics_module.time, "perf_counter", clock)
    logger = MetricsLogger(Metrics(log_freq=4, enable_tensorboard=False), str(tmp_path), rank=0, total_steps=20,
                           flops_per_token=1_000, device=torch.device("cpu"))
    logger.peak_flops = 1e6  # as if on a GPU with a 1 MFLOP/s peak
    clock.now += 50.0  # set-up time, excluded by reset_window
    logger.reset_window()
    for step in (1, 2, 3, 4):
        clock.now += 2.0
        result = logger.step_done(step, tokens=100, values={"loss": 1.0, "lr": 0.1, "grad_norm": 0.5})
        if step == 1:
            assert result["tokens_per_second"] == pytest.approx(50.0)
        elif step < 4:
            assert result is None
    # Steps 2-4: 300 tokens in 6 s.
    assert result["tokens_per_second"] == pytest.approx(50.0)
    assert result["seconds_per_step"] == pytest.approx(2.0)
    assert result["eta_seconds"] == pytest.approx(2.0 * 16)
    assert result["mfu_percent"] == pytest.approx(100 * 1_000 * 50.0 / 1e6)
    assert "mfu 5.0%" in logger.format_line(4, result)


def test_peak_flops_by_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert bf16_peak_flops(torch.device("cuda", 0)) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert bf16_peak_flops(torch.device("cuda", 0)) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert bf16_peak_flops(torch.device("cuda", 0)) is None
    assert bf16_peak_flops(torch.device("cpu")) is None


def test_the_event_file_is_read_back_by_tensorboard_as_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from titanmem.components.event_file import EventFile

    values = torch.randn(1001, dtype=torch.float64) * 3
    events = EventFile(str(tmp_path))
    losses = {step: float(torch.rand(())) for step in (1, 2, 7)}
    for step, loss in losses.items():
        events.add_scalar("loss", loss, step)
    events.add_histogram("values", values, 7)
    events.flush()
    events.close()
    read = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    assert {e.step: e.value for e in read.Scalars("loss")} == pytest.approx(losses, rel=1e-6)  # stored as float32
    (histogram,) = read.Histograms("values")
    assert histogram.step == 7 and histogram.histogram_value.num == values.numel()
    assert histogram.histogram_value.min == pytest.approx(values.min().item())
    assert histogram.histogram_value.max == pytest.approx(values.max().item())
    assert histogram.histogram_value.sum == pytest.approx(values.sum().item())
    assert sum(histogram.histogram_value.bucket) == values.numel()
