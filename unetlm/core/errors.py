"""The project's two kinds of error, which the command line reports as one line each.

:class:`UsageError`: the input is wrong (a recipe, an option, a name); exit status 2.
:class:`RunError`: the input is fine but this run cannot do it here (a missing tokenizer, a
backend the machine lacks); exit status 1.
"""
from __future__ import annotations


class UsageError(ValueError):
    """Bad input; the message names it, its value and what is allowed."""


class RunError(RuntimeError):
    """A run cannot go on; the message says why and what to do."""
