"""Regenerate docs/config.md from the config dataclasses' docstrings: `python tools/config_reference.py`."""

from pathlib import Path

from titanmem.config.manager import format_markdown_reference

if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    target.parent.mkdir(exist_ok=True)
    target.write_text(format_markdown_reference())
    print(f"wrote {target}")
