"""The one configuration error type of the project (torch-free, so the command line's config checks raise it
before torch is imported): :class:`ConfigError`, a ``ValueError`` whose message names the key, the value and
what is allowed. Raised by :class:`rmoe.MoEConfig` and by ``tasks.run.checks``."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value outside what is allowed; the message names the key, the value and what is allowed."""
