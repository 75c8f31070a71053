"""torchrun, ending a failed job with one line: `python -m titanmem.launch [torchrun options] -m titanmem.train ...`.

run_train.sh and launch/run_multinode.sh start their ranks through this rather than `torchrun`: the same launcher
(its options, rendezvous and `--max-restarts`, which relaunch ranks that resume from the newest complete checkpoint),
but a job that fails ends with the line that says why instead of torchrun's traceback and summary box. That line is
the first failed rank's own (a titanmem rank leaves it in torchrun's error file, `titanmem.utils.print_error`), or
how the rank ended when it could not say (a signal, an exit status).
"""

from __future__ import annotations

import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from titanmem.utils import exit_with


def failure_line(error: ChildFailedError) -> str:
    """The one line for a failed job: its first failed rank's own, or how that rank ended."""
    rank, failure = error.get_first_failure()
    others = len(error.failures) - 1
    also = f" (and {others} other rank{'s' if others > 1 else ''} ended after it)" if others > 0 else ""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    if failure.exitcode < 0:
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        if -failure.exitcode in (signal.SIGKILL, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            return (f"rank {rank} (pid {failure.pid}) was ended by {name}{also}: killed from outside (the kernel's "
                    "out-of-memory killer, the scheduler, a node failure) before it could say why; relaunching "
                    "resumes from the newest complete checkpoint")
        return (f"rank {rank} (pid {failure.pid}) crashed with {name}{also} (NCCL's watchdog aborts with SIGABRT on "
                "a collective timeout; a segfault or bus error is a fault in native code or a bad driver): its "
                "output says more; relaunching resumes from the newest complete checkpoint")
    if message and not message.startswith("To enable traceback"):
        line = message.strip().splitlines()[-1]
        return f"{line}{also}" if line.startswith(f"rank {rank}") else f"rank {rank}: {line}{also}"
    return (f"rank {rank} exited with status {failure.exitcode}{also}; its output says why (with --local-ranks-filter, "
            "in torchrun's log folder)")


def main(argv: list[str] | None = None) -> int:
    # torchrun's agent shares its rendezvous store with the ranks, and keeps it across `--max-restarts` relaunches:
    # the relaunched ranks then find the keys of the attempt before (gloo's and NCCL's addresses among them), and
    # their process group can hang forming or connect to the dead ranks (pytorch/pytorch#135712). A store of its own
    # per attempt, on a fresh port, avoids that.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    args = parse_args(argv if argv is not None else sys.argv[1:])
    try:
        run(args)
    except ChildFailedError as error:
        print(f"error: {failure_line(error)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    exit_with(main())
