"""Speed and memory benchmarks (docs/benchmarks.md) and the planner's calibration."""
