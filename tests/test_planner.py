"""titanmem-plan: its counts come from the model the build path makes, under a fake process group that gives the
same shards as a real one; the 8B + 128B table; the dry run of a large world."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import launch_ranks

ROOT = Path(__file__).resolve().parents[1]
DEBUG_PLAN = ["--job.config_file", "train_configs/debug_model.toml", "--parallelism.tp", "2", "--parallelism.mp", "2"]


def plan_tool(*argv) -> subprocess.CompletedProcess:
    return plan_tool_script("titanmem.planner_report", *argv)


def test_the_fake_world_shards_every_parameter_as_a_real_world_does(tmp_path):
    from titanmem.config import build_config
    from titanmem.planner import build_meta, fake_world, resolve_for

    world = 4
    launch_ranks(local_shapes_worker_entry, world, str(tmp_path))
    real = torch.load(tmp_path / "shapes.pt")
    config, _ = build_config(DEBUG_PLAN)
    with fake_world(world):
        model = build_meta(resolve_for(config, world))
        fake = {name: tuple((p.to_local() if hasattr(p, "to_local") else p).shape)
                for name, p in model.named_parameters()}
    assert fake == real
    # And the plan shards as it says: the table's columns over mp 2, the dense weights over FSDP 2 × TP 2.
    assert fake["memory_values.weight"] == (4096, 128)
    assert fake["layers.0.attention.wq.weight"] == (64, 256)


def local_shapes_worker_entry(rank, world, port, folder):
    from helpers import local_shapes_worker

    local_shapes_worker(rank, world, port, folder, DEBUG_PLAN, "cuda")


def test_the_8b_128b_plan_fits_one_80gb_node_in_bf16_and_the_papers_layout_does_not():
    result = plan_tool("--nodes", "1", "--gpus_per_node", "8", "--gb_per_gpu", "80", "--no_search",
                       "--job.config_file", "train_configs/llama_8b_memory_128b.toml")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "33,547,264 values × 4096 (137.4B value parameters)" in out
    assert "| value-table slice | 34.4 | 33,547,264 rows × 512 of 4096 columns (mp 8), bfloat16 |" in out
    assert "| dense parameters | 4.0 |" in out
    own = next(line for line in out.splitlines() if line.startswith("| **total**"))
    assert "**fits**" in own
    paper = out.split("## The paper's layout")[1]
    assert "does NOT fit" in paper and "the table slice 68.7 GB" in paper
    assert "It first fits on 64 GPUs (8 node(s))" in paper


def test_the_ranking_lists_only_meshes_that_fit_fastest_first():
    from titanmem.config import build_config
    from titanmem.planner import Cluster, rank_plans

    config, _ = build_config(["--job.config_file", "train_configs/debug_model.toml"])
    cluster = Cluster(1, 4, 2.5)
    fitting, failing = rank_plans(config, cluster)
    assert fitting and all(found.fits(cluster) for found in fitting)
    assert all(not found.fits(cluster) for found in failing)
    speeds = [found.tokens_per_gpu_second for found in fitting]
    assert speeds == sorted(speeds, reverse=True)
    meshes = {(f.plan.parallel.dp_replicate, f.plan.parallel.dp_shard, f.plan.parallel.tp, f.plan.parallel.mp)
              for f in fitting + failing}
    assert all(r * s * t == 4 and s % m == 0 and m * t <= 4 for r, s, t, m in meshes)


@pytest.mark.parametrize("world", [64, 512])
def test_a_dry_run_builds_a_large_world_on_this_cpu(world):
    nodes = world // 8
    result = plan_tool("--dry_run", "--nodes", str(nodes), "--gpus_per_node", "8", "--job.config_file",
                       "train_configs/debug_model.toml", "--parallelism.mp", "4", "--parallelism.tp", "2",
                       "--memory.n_keys", "128")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"built on a fake process group of {world} ranks" in out
    # `auto` splits the table's rows over the slice's world / tp / mp replicas, and its columns over mp.
    assert f"memory_values.weight: global [16384, 256], rank 0 holds [{16384 // (world // 2 // 4)}, 64]" in out


def test_bad_cluster_and_config_are_one_line():
    bad = plan_tool("--nodes", "0")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --nodes")
    config = plan_tool("--parallelism.mp", "3", "--job.config_file", "train_configs/debug_model.toml")
    assert config.returncode == 2 and config.stderr.strip().startswith("error: config error in parallelism")


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "train_configs").glob("*.toml")
                                          if "PLANNER:" in p.read_text().upper()))
def test_each_preset_header_states_what_the_planner_expects(preset):
    import re

    from titanmem.config import build_config
    from titanmem.planner import Cluster, estimate_config

    text = (ROOT / "train_configs" / preset).read_text()
    header = "".join(line for line in text.splitlines() if line.startswith("#"))
    nodes = int(re.search(r"--nodes (\d+)", header).group(1))
    stated = float(re.search(r"([\d.]+) GB per GPU (?:with headroom|needed)", header).group(1))
    config, _ = build_config(["--job.config_file", str(ROOT / "train_configs" / preset)])
    cluster = Cluster(nodes, 8, 80)
    found = estimate_config(config, cluster)
    assert found.fits(cluster)
    planned = found.total if "with headroom" in header else found.needed
    assert abs(planned / 1e9 - stated) < 0.05, (preset, planned / 1e9, stated)
    assert f"{found.plan.tokens_per_step:,} tokens per step" in header.replace("#", "").replace("  ", " ")


def test_weak_scaling_trains_rank_zeros_share_of_a_larger_world_on_this_cpu(tmp_path):
    """titanmem-weak-scale (whose GPU run proves the 8B + 128B plan) on the debug model: rank 0 of 4, FSDP × MP, with
    the fake group's loopback collectives standing in for the other ranks."""
    dump_folder = tmp_path / "run"
    result = plan_tool_script("titanmem.weak_scale", "--device", "cpu", "--world", "4", "--gpus_per_node", "4",
                              "--steps", "2", "--job.config_file", "train_configs/debug_model.toml",
                              "--parallelism.mp", "2", "--training.seq_len", "32", "--training.local_batch_size", "2",
                              "--job.dump_folder", str(dump_folder))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 4: dp_replicate 1 × dp_shard 4 × tp 1, mp 2" in result.stdout
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in result.stdout.splitlines()
              if line.startswith("step ") and "loss" in line]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    assert not dump_folder.exists()  # a scratch folder of its own: never a real run's


def plan_tool_script(module, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)


KNOWN_RATES = dict(matmul_flops_per_s=3.1e14, activation_elements_per_s=7.0e11, memory_reads_per_s=1.7e12,
                   row_update_bytes_per_s=4.4e12, hbm_bytes_per_s=3.0e12)
# Dense and Memory+ flavours of two sizes: the three fitted terms are all exercised, in different proportions.
CALIBRATION_RUNS = ["llama_134m", "llama_134m_memory", "llama_1.3b", "llama_1.3b_memory"]


def synthetic_steps(rates) -> list[dict]:
    """What a GPU of exactly `rates` would measure for each calibration run (one GPU: no communication)."""
    from titanmem.planner import build_meta, resolve_for, step_work
    from titanmem.config import build_config

    measured = []
    for run in CALIBRATION_RUNS:
        config, _ = build_config(["--job.config_file", f"train_configs/{run}.toml"])
        plan = resolve_for(config, 1)
        work = step_work(plan, build_meta(plan))
        measured.append({"run": run, "step_s": rates.compute_seconds(work),
                         "value_update_s": rates.row_update_seconds(work)})
    return measured


def test_the_step_model_fit_recovers_the_rates_of_its_measurements():
    from titanmem.step_model import Measurement, StepRates, StepWork, fit

    truth = StepRates(**KNOWN_RATES, source="test")
    works = [StepWork(3e12, 2e9, 0, 1.3e8), StepWork(9e11, 1.5e9, 4e10, 1.1e8, row_update_bytes=8e10),
             StepWork(1.2e13, 1e9, 0, 1.3e9), StepWork(1.1e13, 1e9, 2e10, 1.2e9, row_update_bytes=4e10)]
    measurements = [Measurement(f"run {i}", work, truth.compute_seconds(work), truth.row_update_seconds(work))
                    for i, work in enumerate(works)]
    fitted = fit(measurements, truth.hbm_bytes_per_s, "test")
    for name, value in KNOWN_RATES.items():
        assert getattr(fitted, name) == pytest.approx(value, rel=1e-6), name
    # No measurement reads memory: that term costs nothing rather than a made-up rate.
    dense_only = fit(measurements[::2], truth.hbm_bytes_per_s, "test")
    assert dense_only.memory_reads_per_s == float("inf") and dense_only.row_update_bytes_per_s == float("inf")
    assert dense_only.matmul_flops_per_s == pytest.approx(KNOWN_RATES["matmul_flops_per_s"], rel=1e-6)
    # A fit never makes a rate negative: a term that would need one is dropped (infinite rate) instead.
    noisy = [Measurement(m.name, m.work, m.step_seconds * (1.3 if i % 2 else 0.8), m.row_update_seconds)
             for i, m in enumerate(measurements)]
    assert all(rate > 0 for rate in vars(fit(noisy, 3e12, "test")).values() if isinstance(rate, float))
    with pytest.raises(ValueError, match="not longer than its update"):
        fit([Measurement("broken", works[1], 1e-6, 1e-3)], 3e12, "test")


def test_the_calibration_tool_fits_saved_measurements_and_compares_the_planner_with_them(tmp_path):
    """`--load` on measurements that a GPU of known rates would make: the fitted rates reproduce every run's step
    (error 0.0%), and the planner's own estimate is compared with them for every run."""
    import json

    from titanmem.step_model import StepRates

    saved = tmp_path / "steps.json"
    saved.write_text(json.dumps({"source": "synthetic", "measurements": synthetic_steps(
        StepRates(**KNOWN_RATES, source="test"))}))
    result = subprocess.run([sys.executable, "-m", "tools.bench.calibrate_planner", "--load", str(saved)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "matmul_flops_per_s=3.1e+14," in result.stdout and "source='synthetic'" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| llama_")]
    assert len(rows) == len(CALIBRATION_RUNS)
    for row in rows:
        assert row.split("|")[-2].strip() in ("+0.0%", "-0.0%"), row
    broken = tmp_path / "broken.json"
    for content, message in (
            ("{}", "not a measurements file"),
            ('{"source": "x", "measurements": [{"run": "llama_134m", "step_s": -1}]}', "step_s must be a positive"),
            ('{"source": "x", "measurements": [{"run": "llama_134m", "step_s": 0.1, "world": 0}]}', "world must be"),
            ('{"source": "x", "measurements": [{"run": "no_such_config", "step_s": 0.1}]}', "no_such_config.toml"),
            ('{"source": "x", "measurements": [{"run": "llama_134m_memory", "step_s": 0.001, "value_update_s": 0.01}]}',
             "the measurement is wrong")):
        broken.write_text(content)
        result = subprocess.run([sys.executable, "-m", "tools.bench.calibrate_planner", "--load", str(broken)],
                                cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 2 and message in result.stderr, (content, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_the_committed_step_rates_reproduce_the_measured_steps_they_were_fitted_to():
    """docs/planner_step_times.json is the source of `titanmem.step_model.MEASURED`: refitting it gives the same
    rates, and the planner's one-GPU estimate is within 15% of every one-GPU step in it."""
    import json

    from titanmem.config import build_config
    from titanmem.planner import Cluster, step_time, build_meta, resolve_for, step_work
    from titanmem.step_model import MEASURED, Measurement, fit

    saved = json.loads((ROOT / "docs" / "planner_step_times.json").read_text())
    measurements, errors = [], {}
    for record in saved["measurements"]:
        if record.get("world", 1) != 1:
            continue
        name, *overrides = record["run"].split(":")
        config, _ = build_config(["--job.config_file", f"train_configs/{name}.toml", *overrides])
        plan = resolve_for(config, 1)
        model = build_meta(plan)
        tokens = config.training.local_batch_size * config.training.seq_len
        errors[record["run"]] = step_time(plan, model, Cluster(1, 1, 80.0), tokens)[0] / record["step_s"] - 1
        if record["value_update_s"] is not None:
            measurements.append(Measurement(record["run"], step_work(plan, model), record["step_s"],
                                            record["value_update_s"]))
    refit = fit(measurements, MEASURED.hbm_bytes_per_s, "refit")
    for name in ("matmul_flops_per_s", "activation_elements_per_s", "memory_reads_per_s", "row_update_bytes_per_s"):
        assert getattr(refit, name) == pytest.approx(getattr(MEASURED, name), rel=0.01), name
    assert len(errors) >= 5 and all(abs(error) < 0.15 for error in errors.values()), errors

