"""User-facing errors: one line that names the input and the fix.

Everything the user can cause (a bad file, a bad option, a model that is not
available) raises :class:`UserError`; the CLI prints its message without a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line."""

    exit_code = 2


class NonFiniteError(UserError):
    """The loss or the latent became NaN/Inf during optimisation."""

    exit_code = 3
