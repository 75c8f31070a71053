"""Build a `JobConfig` from defaults, a TOML file and `--section.key value` overrides, in that order of precedence.

Every check here runs before any model, tokenizer or process group exists, so a typo costs seconds, not a queue slot.
This module imports nothing from the layers it configures; the run plan (`titanmem.plan`) checks the rest.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import os
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, Literal

from titanmem.config.errors import ConfigError
from titanmem.config.sections import JobConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_TRUE_WORDS = {"true", "1", "yes", "on"}
_FALSE_WORDS = {"false", "0", "no", "off"}


def section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(JobConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(JobConfig)}


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field), read from the class source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_kinds(cls: type) -> dict[str, Any]:
    """The fields of `cls` that name a registry entry (`sections.registered`), and their kinds."""
    return {f.name: f.metadata["kind"] for f in dataclasses.fields(cls) if "kind" in f.metadata}


def _suggest(name: str, candidates: list[str], prefix: str = "") -> str:
    """The closest candidate by the spelling of the name alone (a shared `section.` prefix would make every key of a
    section look close), or the list of valid names when none is close."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid names: {', '.join(prefix + c for c in sorted(candidates))}"


def _describe_choices(choices) -> str:
    return "one of " + ", ".join(repr(choice) for choice in choices)


def _describe_field(cls: type, key: str) -> str:
    """The type of field `key` of section `cls` in words: a registered field's choices as they stand now."""
    kind = _field_kinds(cls).get(key)
    return _describe_choices(kind.names()) if kind is not None else _describe_type(_field_types(cls)[key])


def _describe_type(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return _describe_choices(typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return f"a list of {item.__name__}"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}[annotation]


def _coerce(value: Any, annotation: Any, name: str, from_cli: bool) -> Any:
    """Check (TOML) or convert (CLI text) one value against its field's type."""
    expected = _describe_type(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(name, f"expects {expected}, got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if from_cli:
            text = value.strip()
            try:
                value = tomllib.loads(f"v = {text}")["v"] if text.startswith("[") else [
                    part.strip() for part in text.split(",") if part.strip()
                ]
            except tomllib.TOMLDecodeError:
                raise ConfigError(name, f"expects {expected} such as [1, 2] or 1,2, got {text!r}") from None
        if not isinstance(value, list):
            raise ConfigError(name, f"expects {expected}, got {value!r}")
        return [_coerce(v, item_type, name, from_cli) for v in value]
    if annotation is bool:
        if from_cli and isinstance(value, str):
            word = value.lower()
            if word in _TRUE_WORDS | _FALSE_WORDS:
                return word in _TRUE_WORDS
        if isinstance(value, bool):
            return value
        raise ConfigError(name, f"expects {expected}, got {value!r}")
    if annotation in (int, float):
        # TOML's 1 is a fine float, but 2.5 is no int; and a bool is never a number here.
        accepted = (int,) if annotation is int else (int, float)
        if from_cli and isinstance(value, str):
            try:
                return annotation(value)
            except ValueError:
                raise ConfigError(name, f"expects {expected}, got {value!r}") from None
        if isinstance(value, accepted) and not isinstance(value, bool):
            return annotation(value)
        raise ConfigError(name, f"expects {expected}, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(name, f"expects {expected}, got {value!r}")
    raise TypeError(f"unsupported config type {annotation!r} for {name}")


def _set_value(config: JobConfig, section: str, key: str, value: Any, from_cli: bool, origin: str) -> None:
    sections = section_classes()
    if section not in sections:
        raise ConfigError(section, f"unknown section in {origin}" + _suggest(section, list(sections)))
    cls = sections[section]
    types = _field_types(cls)
    if key not in types:
        elsewhere = [f"{s}.{key}" for s in sections if key in _field_types(sections[s])]
        hint = f"; did you mean '{elsewhere[0]}'?" if elsewhere else _suggest(key, list(types), prefix=f"{section}.")
        raise ConfigError(f"{section}.{key}", f"unknown key in {origin}" + hint)
    value = _coerce(value, types[key], f"{section}.{key}", from_cli)
    kind = _field_kinds(cls).get(key)
    if kind is not None:
        _check_choice(f"{section}.{key}", value, kind)
    setattr(getattr(config, section), key, value)


def _check_choice(name: str, value: str, kind) -> None:
    """A registered field's value names one of its kind's entries."""
    if value not in kind:
        raise ConfigError(name, f"expects {_describe_choices(kind.names())}, got {value!r}")


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("job.config_file", f"file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError("job.config_file", f"{path} is a folder; name a .toml file in it") from None
    except UnicodeDecodeError as e:
        raise ConfigError("job.config_file",
                          f"{path} is not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("job.config_file", f"{path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError("job.config_file", f"cannot read {path}: {e.strerror}") from None


def apply_toml(config: JobConfig, data: dict[str, Any], origin: str) -> None:
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(
                section,
                f"top-level key in {origin} must be a [section] table" + _suggest(section, list(section_classes())),
            )
        for key, value in table.items():
            _set_value(config, section, key, value, from_cli=False, origin=origin)


@dataclasses.dataclass
class CommandLine:
    """What `parse_command_line` found: the config file, flags and the ordered `section.key` overrides."""

    config_file: str | None = None
    print_config: bool = False
    help: bool = False
    overrides: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)


def parse_command_line(argv: list[str]) -> CommandLine:
    parsed = CommandLine()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            parsed.help = True
            continue
        if arg == "--print_config":
            parsed.print_config = True
            continue
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(arg, "expected an override of the form --section.key value or --section.key=value")
        name, has_equals, value = arg[2:].partition("=")
        if not has_equals:
            # A bare flag is `true` for booleans; any other field takes the next word as its value.
            if i < len(argv) and not argv[i].startswith("--"):
                value = argv[i]
                i += 1
            else:
                value = None
        if name == "job.config_file":
            if value is None:
                raise ConfigError(name, "expects a path")
            parsed.config_file = value
        else:
            parsed.overrides.append((name, value))
    return parsed


def _apply_override(config: JobConfig, name: str, value: str | None) -> None:
    section, _, key = name.partition(".")
    if value is None:
        cls = section_classes().get(section)
        if cls is not None and _field_types(cls).get(key) is not bool:
            raise ConfigError(name, "is missing its value (only boolean flags may stand alone)")
        value = "true"
    _set_value(config, section, key, value, from_cli=True, origin="command line")


def check_bounds(config: JobConfig) -> None:
    for section, cls in section_classes().items():
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if "allow" not in meta:
                continue
            value = getattr(getattr(config, section), f.name)
            if value in meta["allow"]:
                continue
            rules = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
                     ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
            for key, symbol, ok in rules:
                bound = meta[key]
                if bound is not None and not ok(value, bound):
                    extra = f" (or {', '.join(map(str, meta['allow']))})" if meta["allow"] else ""
                    raise ConfigError(f"{section}.{f.name}", f"must be {symbol} {bound}{extra}, got {value}")


def check_choices(config: JobConfig) -> None:
    """Every registered field names an entry of its kind (a value set in code, not parsed, is checked here)."""
    for section, cls in section_classes().items():
        for key, kind in _field_kinds(cls).items():
            _check_choice(f"{section}.{key}", getattr(getattr(config, section), key), kind)


def resolve_asset_path(path: str) -> Path:
    """A relative path is tried in the working directory, then in the titanmem checkout that holds the assets."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    in_checkout = Path(__file__).resolve().parents[2] / candidate
    return in_checkout if in_checkout.exists() else candidate


def validate(config: JobConfig) -> None:
    """The checks a config can make on its own: each field's bounds, then each section's cross-field `check()`. Checks
    that need a model shape, the world size or the file system belong to the run plan (`titanmem.plan`)."""
    check_bounds(config)
    check_choices(config)
    for section in section_classes():
        check = getattr(getattr(config, section), "check", None)
        if check is not None:
            check(config)


def build_config(argv: list[str] | None = None) -> tuple[JobConfig, CommandLine]:
    """Defaults, then the TOML file, then each override in order; then every check."""
    command_line = parse_command_line(sys.argv[1:] if argv is None else argv)
    config = JobConfig()
    if command_line.config_file:
        apply_toml(config, load_toml(command_line.config_file), origin=command_line.config_file)
        config.job.config_file = command_line.config_file
    for name, value in command_line.overrides:
        _apply_override(config, name, value)
    if not command_line.help:
        validate(config)
    return config, command_line


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def format_config(config: JobConfig) -> str:
    lines = []
    for section in section_classes():
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(config, section)).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def format_help(usage: str) -> str:
    """`--help` of an entry point: its usage line (`usage`: the command that runs it, and its arguments), then every
    config field with its doc."""
    lines = [
        f"usage: {usage}",
        "",
        "Values merge in this order: defaults, the TOML file, then command-line overrides.",
        "",
    ]
    for section, cls in section_classes().items():
        docs = field_docs(cls)
        defaults = dataclasses.asdict(cls())
        lines.append(f"[{section}]")
        for key in defaults:
            lines.append(f"  --{section}.{key}  ({_describe_field(cls, key)}, default {_toml_value(defaults[key])})")
            lines.extend(textwrap.wrap(docs.get(key, ""), width=100, initial_indent="      ", subsequent_indent="      "))
        lines.append("")
    return "\n".join(lines)


def format_markdown_reference() -> str:
    """The config reference in docs/config.md, generated from the same docstrings as `--help`."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `python tools/config_reference.py` from the docstrings in `titanmem/config/sections.py`; "
        "`python -m titanmem.train --help` prints the same. Set a field in a TOML file under `[section]`, or on the "
        "command line as `--section.key value`.",
        "",
    ]
    for section, cls in section_classes().items():
        docs = field_docs(cls)
        lines += [f"## [{section}]", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, default in dataclasses.asdict(cls()).items():
            cells = [f"`{key}`", _describe_field(cls, key), f"`{_toml_value(default)}`", docs.get(key, "")]
            # A bare | ends a table cell even inside a code span.
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_config(config: JobConfig, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.toml"), "w") as f:
        f.write(format_config(config))
