"""Checkpoint reading and writing, one floor above the model and below training, evaluation and
the API, which all use it.

- :mod:`~unetlm.checkpoint.sharded`: the sharded (DCP) directory format, with its manifest;
- :mod:`~unetlm.checkpoint.store`: a run's ``checkpoints/step-N/`` folders: commit, prune, fall back;
- :mod:`~unetlm.checkpoint.manifest`: what a complete directory holds (sizes, sha256, step, recipe);
- :mod:`~unetlm.checkpoint.safe`: reading pickled files without running code;
- :mod:`~unetlm.checkpoint.shapes`: whether stored tensors fit a model;
- :mod:`~unetlm.checkpoint.trained`: trained models from a run, an exported directory or a file;
- :mod:`~unetlm.checkpoint.export`: ``unetlm export``;
- :mod:`~unetlm.checkpoint.errors`: :class:`CheckpointError`, :class:`UnsafeCheckpointError`.
"""
