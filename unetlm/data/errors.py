"""Errors of the data layer that the command line reports as one line (kept free of heavy imports)."""
from unetlm.core.errors import RunError, UsageError


class PreparedDataError(RunError):
    """A prepared directory cannot serve a recipe: missing, damaged, another format or stale; or a
    prepare could not finish (a full disk). The message names the file and how to fix it. Exit status 1."""


class PreparationIncomplete(PreparedDataError):
    """Some shards of a prepared directory are not written yet (other jobs, or an interrupted run)."""


class SourceError(UsageError):
    """An input file cannot be read as its name says (unreadable, corrupt compressed data) or changed
    while it was read. The message names the file (and the offset). Exit status 2."""
