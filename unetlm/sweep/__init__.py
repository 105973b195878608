"""Sweeps: grids of training runs from one file, run locally or on Slurm, scored and compared alike.

``spec`` reads the sweep file, ``expand`` turns it into runs (recipe + ``--set`` overrides + a
name), ``directory`` lays out the sweep directory, ``command`` is the one training command every
executor runs, ``local`` and ``slurm`` run it, ``memory`` plans it, ``status`` follows it,
``score``, ``fits``, ``report`` and ``figures`` report it. ``unetlm compare`` is a sweep of recipes
at one budget on this machine (:mod:`unetlm.compare`).
"""
