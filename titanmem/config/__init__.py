"""Configuration: one dataclass per TOML section, merged from defaults, a TOML file and CLI overrides."""

from titanmem.config.errors import ConfigError
from titanmem.config.manager import build_config, format_config, format_help, resolve_asset_path
from titanmem.config.sections import JobConfig

__all__ = ["ConfigError", "JobConfig", "build_config", "format_config", "format_help", "resolve_asset_path"]
