"""The recall and finetuning experiments (docs/experiments.md): their runners and reports."""
