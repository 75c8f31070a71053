"""The one exception type for bad configuration, so callers can tell it from a crash."""


class ConfigError(ValueError):
    """A configuration value is wrong. `field` names it as `section.key` (or a section)."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"config error in {field}: {problem}")
