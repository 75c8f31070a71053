"""Train on one parallel plan, kill every rank after a save, resume on another plan, and compare the resumed run's
losses with an uninterrupted run of the first plan. Prints one markdown table; exits 1 if the kill, the resume or
the losses are not as they must be.

    python -m tools.drills.resume_drill --nproc 8 --plan "--parallelism.mp 8" --resume-plan "--parallelism.mp 4" \
        [--steps 20 --interval 10 --kill-at 13] [--nodes 2] [--work DIR] -- [config overrides for every launch]

Three launches, each of `--nproc` ranks (GPUs, or gloo CPU ranks with `--training.device cpu`):
1. reference: `--plan`, `--steps` steps, a checkpoint every `--interval`;
2. killed: the same in a fresh folder, with TITANMEM_CRASH_AT=step:<kill-at>, so that every rank SIGKILLs itself
   after that step's optimizer step, as a node failure would;
3. resumed: in the killed run's folder, on `--resume-plan`: it must resume from the newest checkpoint before the kill
   and train to `--steps`.
Each launch is one torchrun on this host, or with `--nodes N`, N launch/run_multinode.sh "nodes" meeting at a c10d
rendezvous on 127.0.0.1 (it proves the launcher, not a network). The table gives, per launch: the steps it logged,
the median tokens/s per rank and the peak memory (rank 0), how long training waited for each save and how long the
load took, and the largest relative loss difference against the reference over the steps both logged (the losses
as logged, to 4 decimals: in deterministic mode on CPU a resume on the same plan matches them exactly, and one on
another plan to the order of fp32 sums).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEP = re.compile(r"step +(\d+) \| loss ([\d.]+)(?:.*?tok/s ([\d,]+))?(?:.*?mem ([\d.]+) GiB)?")
SAVED = re.compile(r"saved checkpoint step-(\d+).*?waited ([\d.]+) s")
RESUMED = re.compile(r"resumed from \S*step-(\d+) in ([\d.]+) s")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_plan(args, plan: list[str]) -> str | None:
    """The error line of `plan` on `args.nproc` ranks, checked in this process as the launchers check a config; None
    when it is valid. Both plans are checked before the first launch: a bad resume plan would otherwise show only
    after two runs."""
    done = subprocess.run([sys.executable, "-m", "titanmem.train", "--job.config_file", args.config, *plan,
                           *args.overrides, "--print_config"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "WORLD_SIZE": str(args.nproc)}, timeout=300)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]


def launch(args, folder: Path, plan: list[str], crash: str | None, log: Path) -> tuple[int, str]:
    """One launch of `args.nproc` ranks, rank 0's output written to `log` as it comes (other nodes' beside it);
    returns the exit code and that output."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TITANMEM_NO_INSTALL": "1",
           "PYTHON": sys.executable}
    env.pop("TITANMEM_CRASH_AT", None)
    if crash:
        env["TITANMEM_CRASH_AT"] = crash
    train_args = ["--job.dump_folder", str(folder), "--training.steps", str(args.steps), "--checkpoint.enable",
                  "--checkpoint.interval", str(args.interval), "--checkpoint.keep_latest_k", "0",
                  "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false", *plan, *args.overrides]
    if args.nodes == 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(args.nproc), "--local-ranks-filter", "0", "--role", "rank", "--tee", "3", "-m",
                   "titanmem.train", "--job.config_file", args.config, *train_args]
        with open(log, "w") as out:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=args.timeout).returncode
        return code, log.read_text()
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [log] + [log.with_suffix(f".node{node}.log") for node in range(1, args.nodes)]
    outs = [open(path, "w") for path in logs]
    nodes = []
    try:
        for node, out in enumerate(outs):
            nodes.append(subprocess.Popen([str(ROOT / "launch" / "run_multinode.sh"), *train_args], cwd=ROOT,
                                          env={**env, "CONFIG_FILE": args.config, "NNODES": str(args.nodes),
                                               "NGPU": str(args.nproc // args.nodes), "NODE_RANK": str(node),
                                               "RDZV_ENDPOINT": endpoint, "RDZV_ID": "resume-drill"},
                                          stdout=out, stderr=subprocess.STDOUT))
        codes = [node.wait(timeout=args.timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:  # a node past the timeout: the others must not be left running
                node.kill()
        for out in outs:
            out.close()
    return next((code for code in codes if code != 0), 0), log.read_text()


def summary(output: str) -> dict:
    steps = {int(m[1]): (float(m[2]), m[3], m[4]) for m in STEP.finditer(output)}
    speeds = [float(v[1].replace(",", "")) for v in steps.values() if v[1]]
    memory = [float(v[2]) for v in steps.values() if v[2]]
    resumed = RESUMED.search(output)
    return {"losses": {step: v[0] for step, v in steps.items()},
            "tokens_per_s": statistics.median(speeds[1:] or speeds) if speeds else None,
            "peak_gib": max(memory) if memory else None,
            "saves": [(int(step), float(wait)) for step, wait in SAVED.findall(output)],
            "resumed": (int(resumed[1]), float(resumed[2])) if resumed else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "train_configs" / "debug_model.toml"),
                        help="TOML config (default train_configs/debug_model.toml)")
    parser.add_argument("--nproc", type=int, default=8, help="ranks in all (default 8)")
    parser.add_argument("--nodes", type=int, default=1, help="launch/run_multinode.sh nodes sharing --nproc")
    parser.add_argument("--plan", default="", help="overrides of the reference and killed launches")
    parser.add_argument("--resume-plan", default="", help="overrides of the resumed launch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=10, help="checkpoint interval")
    parser.add_argument("--kill-at", type=int, default=13, help="the step after which every rank dies")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest relative loss difference of the resumed run from the reference (default 1e-3)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per launch")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="after --: config overrides for every launch")
    args = parser.parse_args()
    if args.nproc < 1 or args.nodes < 1 or args.nproc % args.nodes:
        parser.error(f"--nproc {args.nproc} must be a positive multiple of --nodes {args.nodes}")
    if not args.interval <= args.kill_at < args.steps:
        parser.error(f"--kill-at must be at least --interval ({args.interval}) and below --steps ({args.steps})")
    work = Path(args.work or tempfile.mkdtemp(prefix="resume_drill_"))
    if (work / "reference").exists() or (work / "drill").exists():
        # The killed launch would resume from the earlier drill's checkpoints instead of starting fresh.
        parser.error(f"--work {work} holds an earlier drill; choose a new folder")
    work.mkdir(parents=True, exist_ok=True)
    expected_resume = args.kill_at // args.interval * args.interval
    plan, resume_plan = shlex.split(args.plan), shlex.split(args.resume_plan)
    for flag, overrides in (("--plan", plan), ("--resume-plan", resume_plan)):
        error = check_plan(args, overrides)
        if error:
            print(f"{flag}: {error}", file=sys.stderr)
            return 2

    runs, failures = {}, []
    for name, folder, run_plan, crash in (("reference", work / "reference", plan, None),
                                          ("killed", work / "drill", plan, f"step:{args.kill_at}"),
                                          ("resumed", work / "drill", resume_plan, None)):
        code, output = launch(args, folder, run_plan, crash, work / f"{name}.log")
        runs[name] = dict(summary(output), code=code, plan=" ".join(run_plan) or "(config)")
        if (code != 0) != (name == "killed"):
            failures.append(f"{name}: exit code {code}; see {work / f'{name}.log'}")
            if name == "reference":
                break
    # The kill comes after the optimizer step and before that step's log line.
    if "killed" in runs and max(runs["killed"]["losses"], default=0) not in (args.kill_at - 1, args.kill_at):
        failures.append(f"killed: its last step is {max(runs['killed']['losses'], default=0)}, not {args.kill_at}")
    if "resumed" in runs and (runs["resumed"]["resumed"] or (None,))[0] != expected_resume:
        failures.append(f"resumed: resumed from {runs['resumed']['resumed']}, not step-{expected_resume}")

    reference = runs["reference"]["losses"]
    print(f"{args.nproc} ranks" + (f" on {args.nodes} launcher nodes" if args.nodes > 1 else "") + f", work {work}")
    print("| launch | plan | steps logged | tokens/s per rank | peak memory (GiB) | saves: step (s waited) | load (s) "
          "| largest loss difference from the reference |")
    print("| --- | --- | --- | ---: | ---: | --- | ---: | ---: |")
    for name, run in runs.items():
        logged = sorted(run["losses"])
        common = [step for step in logged if step in reference]
        difference = max((abs(run["losses"][s] - reference[s]) / reference[s] for s in common), default=None)
        if name == "resumed" and (difference is None or difference > args.tolerance):
            failures.append(f"resumed: relative loss difference {difference} from the reference (tolerance "
                            f"{args.tolerance})")
        print(f"| {name} | `{run['plan']}` | {logged[0] if logged else '-'}–{logged[-1] if logged else '-'} | "
              f"{run['tokens_per_s'] or 0:,.0f} | {run['peak_gib'] if run['peak_gib'] is not None else '-'} | "
              f"{', '.join(f'{s} ({w:.2f})' for s, w in run['saves']) or '-'} | "
              f"{run['resumed'][1] if run['resumed'] else '-'} | "
              f"{'-' if difference is None else f'{difference:.2e}'} |")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
