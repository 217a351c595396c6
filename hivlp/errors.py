"""Exceptions with messages written for the person at the keyboard."""


class HivlpError(Exception):
    """Base class: the CLI prints these without a traceback and exits with `exit_code`."""

    exit_code = 1


class UsageError(HivlpError):
    """Bad arguments, unreadable input or a config that cannot work (CLI exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A config field is unknown, of the wrong type or inconsistent; the message names the field."""


class DatasetError(UsageError):
    """A dataset file cannot be read as a Karpathy-format retrieval dataset."""
