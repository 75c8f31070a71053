"""The checkout's scripts that are no user command (those install with titanmem: `titanmem-plan` and the rest).

Each runs as a module from the checkout's root, `python -m tools.<folder>.<script>` (under torchrun,
`torchrun ... -m tools.<folder>.<script>`), and imports the installed titanmem as any user would. A script that
shares code with another imports it by its full name (`from tools.assets.fact_sources import ...`), which the root
on the import path makes work, with no path set up by hand. By folder:

- bench/: speed and memory benchmarks (docs/benchmarks.md) and the planner's calibration;
- experiments/: the recall and finetuning experiments' runners and reports (docs/experiments.md);
- assets/: the build of the bundled assets and of the large corpus from pinned packages;
- drills/: crash and resume drills that kill real runs and check what they resume to.

Beside them: install.sh and run_tests.sh (which install titanmem on first use) and config_reference.py.
"""
