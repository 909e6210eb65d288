"""Exception hierarchy: every user mistake is one of these, with a one-line message.

The command line prints ``str(error)`` and exits non-zero without a traceback;
library users can catch :class:`KleverError` to handle every expected failure.
"""

from __future__ import annotations


class KleverError(Exception):
    """Base class of every error klever_nb raises on purpose (bad input, bad settings)."""


class InputError(KleverError, ValueError):
    """A data file cannot be used: missing, unreadable, wrong layout, units or overlap.

    The message names the file (and the HDU or key) and says what to do.
    """


class ConfigError(KleverError, ValueError):
    """A galaxy or sample TOML file, or a keyword argument, is invalid.

    The message names the file and the key.
    """
