"""Evaluate a checkpoint: `python -m titanmem.eval --job.config_file FILE [--checkpoint.load_step N]`, under torchrun
for a sharded model. Loads the newest complete checkpoint of the run (or `load_step`) as training would, then
appends held-out perplexity and fact recall to `<job.dump_folder>/eval/results.jsonl` and prints them."""

from __future__ import annotations

import json
import sys

from titanmem.config import ConfigError, build_config
from titanmem.utils import setup_logging


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    from titanmem.train import Trainer

    try:
        config, _ = build_config(argv)
        if not config.checkpoint.enable:
            raise ConfigError("checkpoint.enable", "is false: there is no checkpoint to evaluate; set it to true")
        trainer = Trainer(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if trainer.checkpointer.load() is None:
            print(f"error: config error in checkpoint.folder: no complete checkpoint under {config.job.dump_folder}",
                  file=sys.stderr)
            return 2
        results = trainer.evaluate()
        if trainer.rank == 0:
            print(json.dumps(results, indent=1))
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
