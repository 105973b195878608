class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, incomplete, unreadable or refused (it would run code); the message names what."""
