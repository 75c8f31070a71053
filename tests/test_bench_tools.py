"""The benchmark tools run end to end on a CPU (their figures are GPU benchmarks, recorded in docs/benchmarks.md)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_splits_a_step_into_phases_that_add_up():
    result = subprocess.run(
        [sys.executable, "-m", "tools.bench.bench_train", "--steps", "3", "--warmup", "1",
         "debug_dense:--training.seq_len:32:--training.local_batch_size:2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| debug_dense"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    step_ms = float(cells[2]) * 1e3
    phases = [float(cell.removesuffix(" ms")) for cell in cells[6:10]]
    assert all(phase >= 0 for phase in phases) and phases[0] > 0 and phases[1] > 0
    # Forward, backward and the optimizer are the step, up to the batch fetch and the scheduler.
    assert 0.5 * step_ms < sum(phases) <= 1.05 * step_ms, (phases, step_ms)


def test_exposed_time_is_the_communication_no_compute_overlaps():
    from tools.bench.bench_train import uncovered

    assert uncovered([(0, 10), (20, 30)], [(5, 25)]) == 10
    assert uncovered([(0, 10), (5, 15)], [(2, 4), (3, 6), (14, 40)]) == 15 - 4 - 1
    assert uncovered([(0, 10)], []) == 10 and uncovered([], [(0, 5)]) == 0


def test_the_resume_drill_kills_after_a_save_and_resumes_on_another_plan(tmp_path):
    """tools/drills/resume_drill.py on 2 gloo ranks: FSDP 2, killed after step 3, resumed from step-2 as MP 2; the
    resumed losses must match the uninterrupted run's."""
    result = subprocess.run(
        [sys.executable, "-m", "tools.drills.resume_drill", "--nproc", "2", "--plan", "--parallelism.dp_shard 2",
         "--resume-plan", "--parallelism.mp 2", "--steps", "4", "--interval", "2", "--kill-at", "3", "--tolerance",
         "1e-4", "--work", str(tmp_path), "--", "--training.device", "cpu", "--training.deterministic",
         "--training.seq_len", "32", "--training.local_batch_size", "2", "--data.num_workers", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")]
            for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["killed"][2] in ("1–2", "1–3") and rows["resumed"][2] == "3–4"
    assert rows["resumed"][1] == "`--parallelism.mp 2`" and float(rows["resumed"][6]) >= 0
    # The killed run is the reference until it dies: the same plan and data, bit for bit in deterministic mode.
    assert float(rows["killed"][7]) == 0.0
    # A run that cannot resume where it must is reported and fails.
    broken = subprocess.run(
        [sys.executable, "-m", "tools.drills.resume_drill", "--nproc", "2", "--steps", "4", "--interval", "2",
         "--kill-at", "1", "--work", str(tmp_path / "bad")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert broken.returncode == 2 and "--kill-at must be at least --interval" in broken.stderr
    # A resume plan that cannot run is named before the first launch; so is a folder that holds an earlier drill.
    drill = [sys.executable, "-m", "tools.drills.resume_drill", "--nproc", "2", "--steps", "4", "--interval", "2",
             "--kill-at", "3"]
    bad_plan = subprocess.run([*drill, "--resume-plan", "--parallelism.mp 3", "--work", str(tmp_path / "plan"), "--",
                               "--training.device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad_plan.returncode == 2
    assert bad_plan.stderr.startswith("--resume-plan: error: config error in parallelism.mp")
    assert not (tmp_path / "plan" / "reference").exists()
    reused = subprocess.run([*drill, "--work", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert reused.returncode == 2 and "holds an earlier drill" in reused.stderr


def test_bench_checkpoint_measures_the_disk_and_a_save_and_cold_loads_of_a_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tools.bench.bench_checkpoint", "--work", str(tmp_path), "--disk", "0.1", "--run",
         "debug_model --training.device cpu --training.seq_len 32 --training.local_batch_size 2 "
         "--checkpoint.io_threads 3 --data.num_workers 0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    disk = [line for line in result.stdout.splitlines() if line.startswith("| 1 file") or line.startswith("| 8 files")]
    assert len(disk) == 2 and all(float(cell) > 0 for line in disk for cell in line.strip("|").split("|")[2:])
    row = next(line for line in result.stdout.splitlines() if line.startswith("| debug_model"))
    cells = [float(cell) for cell in row.strip("|").split("|")[1:]]
    checkpoint_gb, save_s, save_rate = cells[:3]
    assert checkpoint_gb > 0 and save_s > 0 and save_rate > 0
    assert cells[3] < save_s  # the files were summed as written: little or nothing read back
    assert not list(tmp_path.glob("disk-*.bin"))  # the disk probe cleans up


def test_bench_checkpoint_saves_and_loads_a_synthetic_state_with_each_thread_count(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.bench.bench_checkpoint", "--work", str(tmp_path), "--state",
                             "0.02", "--threads", "1", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.stdout.splitlines()
            if line.startswith(("| pageable", "| pinned"))]
    assert [(row[0], row[1]) for row in rows] == [("pageable", "1"), ("pinned", "1"), ("pageable", "2"),
                                                   ("pinned", "2")]
    assert all(row[5] == f"{row[1]} of {row[1]}" and float(row[4]) > 0 and float(row[7]) > 0 for row in rows)
    assert not list(tmp_path.glob("state-*"))


def test_bench_export_times_each_format_from_a_random_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tools.bench.bench_export", "--job.config_file", "train_configs/debug_model.toml",
         "--work", str(tmp_path), "--format", "titanmem:fp32", "--format", "hf:bf16"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.stdout.splitlines()
            if line.startswith(("| titanmem", "| hf"))]
    assert [row[:2] for row in rows] == [["titanmem", "fp32"], ["hf", "bf16"]]
    for row in rows:
        stored, written, seconds, _, peak = map(float, row[2:])
        assert stored > 0 and written > 0 and seconds > 0 and 0.1 < peak < 8
    # bf16 halves the floating-point bytes.
    assert float(rows[1][3]) < 0.6 * float(rows[0][3])
    assert not list(tmp_path.glob("export-*"))  # each export is removed once measured
    bad = subprocess.run([sys.executable, "-m", "tools.bench.bench_export", "--job.config_file", "x.toml", "--format",
                          "onnx"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--format takes FORMAT:DTYPE" in bad.stderr
