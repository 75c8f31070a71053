"""The one exception type for bad configuration, so callers can tell it from a crash."""

_PREFIX = "config error in "


class ConfigError(ValueError):
    """A configuration value is wrong. `field` names it as `section.key` (or a section)."""

    def __init__(self, field: str, problem: str | None = None):
        if problem is None:
            field, problem = _parse_message(field)
        self.field = field
        self.problem = problem
        super().__init__(f"{_PREFIX}{field}: {problem}")


def _parse_message(message: str) -> tuple[str, str]:
    """(field, problem) from a message that ends with a ConfigError's own text. An error rebuilt from one argument
    comes from unpickling, or from a data-loader worker, where torch passes the worker's formatted traceback, whose
    last line is the error; the run then still ends with one line."""
    last = message.strip().splitlines()[-1] if message.strip() else ""
    start = last.find(_PREFIX)
    if start >= 0 and ": " in last[start + len(_PREFIX):]:
        field, problem = last[start + len(_PREFIX):].split(": ", 1)
        return field, problem
    return "config", message
