"""Exceptions users see. Each message names what was wrong and what would have been accepted."""


class VLMDistillError(Exception):
    """Base class of vlmdistill's own errors."""


class ConfigError(VLMDistillError, ValueError):
    """A config or recipe key or value is invalid."""


class UnknownPluginError(VLMDistillError, KeyError):
    """No plugin is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class IncompatibleTeacherError(VLMDistillError, ValueError):
    """Teacher and student cannot be paired by this plugin; raised at `wrap` time."""


class UnsupportedModelError(VLMDistillError, ValueError):
    """The model lacks something the plugin needs (a module, a config field, an output)."""


class DataError(VLMDistillError, ValueError):
    """A data file is missing, unreadable or inconsistent; the message names the file."""


class NonFiniteLossError(VLMDistillError, FloatingPointError):
    """A loss term was NaN or infinite during training; the message names the term and the optimizer step."""


class MissingDependencyError(VLMDistillError, ImportError):
    """A feature needs an optional package that is not installed; the message names the extra that brings it."""
