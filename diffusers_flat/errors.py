"""The one error class of the package: input that cannot be used as asked."""

from __future__ import annotations


class FlatError(ValueError):
    """Input the library cannot use as asked, with a one-line message that teaches what is allowed.

    When one argument is at fault, `parameter` names it and the message starts with that name (the library speaks in
    its parameters; the scripts show the same message with the name replaced by their `--flag`).

    Args:
        message: what is wrong and what is allowed, in one line.
        parameter: the name of the function argument at fault, if one is.

    Example:
        >>> err = FlatError("rho must be a number >= 0, got -1.0", parameter="rho")
        >>> str(err), err.parameter
        ('rho must be a number >= 0, got -1.0', 'rho')
    """

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter
