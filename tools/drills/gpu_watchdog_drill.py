"""On one GPU: the watchdog times the step the device is stuck in (not the host's, which runs ahead), and its failure
path writes the NCCL flight recorder's record and ends the process with one line. Prints a table of checks; exits 1
if one fails.

    python -m tools.drills.gpu_watchdog_drill [--work DIR]

A child process forms a one-rank NCCL group with the flight recorder on (`comm.trace_buf_size`), and a watchdog that
is told of two ranks, so that the second, which never reports, stands for a peer that stopped. Step 3 keeps the
device busy for a minute (`torch.cuda._sleep`) while the host launches steps 4 to 6 and then waits. The watchdog must
end the child within `TRAIN_TIMEOUT` plus the report's bounds, with one line that names step 3 on the device, the
silent rank 1 and the recorder's folder, and the record must hold the group's all_reduces. The CPU suite
(tests/test_comm_faults.py) checks the same path with gloo ranks and fake device markers.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from titanmem.components.watchdog import (FAIL_WITHIN_SECONDS, REPORT_GRACE_SECONDS, TRACE_FOLDER, CommWatchdog,
                                          set_backstop_timeouts, set_flight_recorder_env)
from titanmem.config.sections import Comm

TRAIN_TIMEOUT = 4
"""comm.train_timeout_seconds of the child: far below the minute its step 3 keeps the device busy."""
STUCK_STEP = 3


def stuck_child(folder: str, port: int) -> None:
    """The run whose device hangs in STUCK_STEP; the watchdog ends it (os._exit) before the last line prints."""
    comm = Comm(init_timeout_seconds=60, train_timeout_seconds=TRAIN_TIMEOUT, trace_buf_size=2000)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    set_flight_recorder_env(comm, folder, device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=110))
    set_backstop_timeouts(comm)
    watchdog = CommWatchdog(comm, 2, folder, lambda: "", device_event=torch.cuda.Event)
    x = torch.ones(1 << 20, device=device)
    for step in range(1, 7):
        watchdog.begin_step(step)
        dist.all_reduce(x)
        if step == STUCK_STEP:
            torch.cuda._sleep(int(2e9 * 60))  # about a minute of a ~2 GHz device's cycles
        watchdog.end_step(step)
        print(f"the host launched step {step}", flush=True)
    time.sleep(120)
    print("the watchdog did not end the run", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=None, help="folder for the child's dump (default: a temporary one)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=29533, help="the child's one-rank group's port")
    args = parser.parse_args()
    if args.child:
        stuck_child(args.child, args.port)
        return 0
    if not torch.cuda.is_available():
        print("error: this drill needs a GPU (the CPU suite covers the rest: tests/test_comm_faults.py)")
        return 2
    folder = Path(args.work or tempfile.mkdtemp(prefix="gpu_watchdog_drill_"))
    bound = TRAIN_TIMEOUT + FAIL_WITHIN_SECONDS + 15  # plus start-up and a minute's sleep that must not be waited for
    start = time.monotonic()
    try:
        child = subprocess.run([sys.executable, "-m", "tools.drills.gpu_watchdog_drill", "--child", str(folder),
                                "--port", str(args.port)], capture_output=True, text=True, timeout=bound + 40)
    except subprocess.TimeoutExpired as e:
        print(f"error: the child did not end within {bound + 40} s\n{e.stdout}\n{e.stderr}")
        return 1
    took = time.monotonic() - start
    output = child.stdout + child.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    record = folder / TRACE_FOLDER / "rank_0"
    entries = pickle.loads(record.read_bytes()).get("entries", []) if record.exists() else []
    names = sorted({str(entry.get("profiling_name")) for entry in entries})
    checks = {
        "exit status 1": child.returncode == 1,
        "exactly one error line": len(errors) == 1,
        f"it names step {STUCK_STEP} on the device": any(
            f"step {STUCK_STEP} did not finish on the device within {TRAIN_TIMEOUT} s" in e for e in errors),
        "it names the silent rank 1": any("rank 1 did not answer" in e for e in errors),
        "it points at the flight recorder's folder": any(str(record.parent) in e for e in errors),
        f"ended in {took:.1f} s (bound {bound} s)": took < bound,
        f"the record holds the all_reduces ({len(entries)} entries: {', '.join(names)})": (
            len(entries) >= STUCK_STEP and any("all_reduce" in n or "allreduce" in n for n in names)),
    }
    print(f"report grace {REPORT_GRACE_SECONDS} s, fail within {FAIL_WITHIN_SECONDS} s\n")
    print("| check | result |\n| --- | --- |")
    for name, ok in checks.items():
        print(f"| {name} | {'pass' if ok else 'FAIL'} |")
    if not all(checks.values()):
        print(f"\nthe child's output:\n{output[-4000:]}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
