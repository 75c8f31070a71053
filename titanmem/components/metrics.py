"""Console and TensorBoard metrics, written by rank 0 only."""

from __future__ import annotations

import datetime
import logging
import os
import time

import torch

from titanmem.components.event_file import EventFile
from titanmem.config.sections import Metrics as MetricsConfig

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peak per GPU, by a substring of the device name (first match wins).
_BF16_PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H20", 148e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
]


def bf16_peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s for MFU, or None where unknown (then MFU is not reported rather than guessed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _BF16_PEAK_FLOPS:
        if key in name:
            return flops
    return None


class MetricsLogger:
    """Turns per-step numbers into a console line and TensorBoard scalars every `log_freq` steps."""

    def __init__(
        self,
        config: MetricsConfig,
        dump_folder: str,
        rank: int,
        total_steps: int,
        flops_per_token: int,
        device: torch.device,
        bf16: bool = True,
    ):
        self.config = config
        self.enabled = rank == 0
        self.total_steps = total_steps
        self.flops_per_token = flops_per_token
        self.device = device
        # MFU is quoted against the bf16 tensor-core peak, so only for runs that compute in bf16.
        self.peak_flops = bf16_peak_flops(device) if bf16 else None
        self.writer: EventFile | None = None
        if self.enabled and config.enable_tensorboard:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            folder = os.path.join(dump_folder, config.save_tb_folder, stamp)
            try:
                self.writer = EventFile(folder)
            except OSError as error:
                self._tensorboard_failed(error, folder)
        self.reset_window()

    def _to_tensorboard(self, step: int, scalars: dict[str, float],
                        histograms: dict[str, torch.Tensor] | None = None) -> None:
        if self.writer is None:
            return
        try:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            for key, values in (histograms or {}).items():
                self.writer.add_histogram(key, values, step)
            self.writer.flush()
        except OSError as error:
            self._tensorboard_failed(error, self.writer.path)

    def _tensorboard_failed(self, error: OSError, where: str) -> None:
        """TensorBoard is a view of the run, not the run: a full or lost disk under it is reported once and training
        goes on (a checkpoint that cannot be written ends the run, with its own line)."""
        logger.warning("TensorBoard logging stopped: %s could not be written (%s); training goes on, and the console "
                       "keeps the metrics", where, error.strerror or error)
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass  # the same failed write, met again by the close's flush

    def reset_window(self) -> None:
        """Start a new throughput window (at the start of the loop, so set-up time is not counted)."""
        self._window_start = time.perf_counter()
        self._window_tokens = 0
        self._window_steps = 0

    def should_log(self, step: int) -> bool:
        return step % self.config.log_freq == 0 or step == self.total_steps or step == 1

    def step_done(self, step: int, tokens: int, values: dict[str, float] | None) -> dict[str, float] | None:
        """Account one finished step of `tokens` tokens on this rank; on a logging step, emit and return the full
        set of metrics (tokens/s and MFU are per rank, i.e. per GPU). `values` (the step's scalars) are needed on
        logging steps only."""
        self._window_tokens += tokens
        self._window_steps += 1
        if not self.should_log(step):
            return None
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        metrics = dict(values)
        metrics["tokens_per_second"] = self._window_tokens / elapsed
        metrics["seconds_per_step"] = elapsed / self._window_steps
        metrics["eta_seconds"] = metrics["seconds_per_step"] * (self.total_steps - step)
        if self.peak_flops:
            metrics["mfu_percent"] = 100 * self.flops_per_token * metrics["tokens_per_second"] / self.peak_flops
        if self.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.enabled:
            logger.info(self.format_line(step, metrics))
            self._to_tensorboard(step, metrics)
        self.reset_window()
        return metrics

    def log_memory_telemetry(self, step: int, scalars: dict[str, float], histograms: dict[str, torch.Tensor]) -> None:
        """The memory telemetry of the last window: all of it to TensorBoard, the pool's headline to the console."""
        if not self.enabled or not scalars:
            return
        pool = {k.rsplit("/", 1)[1]: v for k, v in scalars.items() if k.startswith("memory/pool/")}
        if pool:
            logger.info(
                "step %d memory | rows hit %.1f%% | never hit %.1f%% | KL to uniform %.3f | top-1 weight %.3f | "
                "hottest 1%% take %.1f%% of reads", step, 100 * pool["hit_fraction"], 100 * pool["never_hit_fraction"],
                pool["kl_to_uniform"], pool["top1_weight"], 100 * pool["hottest_1pct_share"],
            )
        self._to_tensorboard(step, scalars, histograms)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Extra scalars (eval results) to TensorBoard."""
        if self.enabled:
            self._to_tensorboard(step, scalars)

    def format_line(self, step: int, m: dict[str, float]) -> str:
        parts = [
            f"step {step:>{len(str(self.total_steps))}}",
            f"loss {m['loss']:.4f}",
            f"lr {m['lr']:.2e}",
            f"grad_norm {m['grad_norm']:.3f}",
            *([f"value_grad_norm {m['value_grad_norm']:.3f}"] if "value_grad_norm" in m else []),
            f"tok/s {m['tokens_per_second']:,.0f}",
            f"eta {datetime.timedelta(seconds=round(m['eta_seconds']))}",
        ]
        if "mfu_percent" in m:
            parts.append(f"mfu {m['mfu_percent']:.1f}%")
        if "peak_memory_gib" in m:
            parts.append(f"mem {m['peak_memory_gib']:.2f} GiB")
        if m.get("nonfinite_skips"):
            parts.append(f"skipped {int(m['nonfinite_skips'])}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as error:
                self._tensorboard_failed(error, self.writer.path)
