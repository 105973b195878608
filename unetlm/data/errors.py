"""Errors of the data layer that the command line reports as one line (kept free of heavy imports)."""
from unetlm.core.errors import RunError


class PreparedDataError(RunError):
    """A prepared directory cannot serve a recipe: missing, damaged, another format or stale; or a
    prepare could not finish (a full disk). The message names the file and how to fix it. Exit status 1."""


class PreparationIncomplete(PreparedDataError):
    """Some shards of a prepared directory are not written yet (other jobs, or an interrupted run)."""
