"""The frame every command shares: bad input ends it with one line, `error: ...`, and exit code 2, never a traceback.

`run_command` is the whole start of a command that takes the run's command line (logging, the config and its plan,
`--help` and `--print_config`); `run_reader` adds the run built with a checkpoint's weights (`with_run`), for the
commands that read one. A command with arguments of its own wraps its main in `ends_in_one_line`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch.distributed as dist

from titanmem.build import Run, build_run
from titanmem.config import ConfigError, JobConfig
from titanmem.plan import Purpose, RunPlan, plan_from_command_line
from titanmem.utils import print_error, setup_logging, storage_failure


def ends_in_one_line(main: Callable[..., int]) -> Callable[..., int]:
    """`main`, with a config error that escapes it printed as the command's one line (also into torchrun's error file
    of the rank) and returned as exit code 2; and a file that could not be written for space, permission or a failing
    disk (`storage_failure`) likewise, as exit code 1."""

    @functools.wraps(main)
    def command(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except ConfigError as error:
            print_error(error)
            return 2
        except OSError as error:
            line = storage_failure(error)
            if line is None:
                raise
            print_error(line)
            return 1

    return command


def run_command(argv: list[str] | None, purpose: Purpose, usage: str,
                body: Callable[[JobConfig, RunPlan], int]) -> int:
    """Set up logging, read the config and resolve its plan for `purpose`, then return `body(config, plan)`; the exit
    code of `--help` (headed by `usage`), `--print_config` or bad input instead, where one of them ends the command."""
    setup_logging()
    started = plan_from_command_line(argv, purpose, usage)
    if isinstance(started, int):
        return started
    return ends_in_one_line(body)(*started)


def run_reader(argv: list[str] | None, purpose: Purpose, usage: str, body: Callable[[RunPlan, Run], int]) -> int:
    """`run_command` for a command that reads a checkpoint: `body(plan, run)` gets the run with its weights."""
    return run_command(argv, purpose, usage, lambda config, plan: with_run(plan, body))


def with_run(plan: RunPlan, body: Callable[[RunPlan, Run], int]) -> int:
    """`body(plan, run)` on the run built from `plan` (a reader's: with the checkpoint's weights); the process group
    ends with it, however it ends."""
    run = build_run(plan)
    try:
        return body(plan, run)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
