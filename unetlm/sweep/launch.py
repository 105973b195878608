"""``unetlm sweep SWEEP.toml``: expand, plan, then run locally or submit to Slurm (or only show it all)."""
from __future__ import annotations

import shutil
from pathlib import Path

from unetlm.core.errors import RunError
from unetlm.recipe.structure import unstructure
from unetlm.sweep.command import node_command, shell_text, train_args
from unetlm.sweep.directory import SweepDir
from unetlm.sweep.expand import expand, sci
from unetlm.sweep.local import Outcome, run_local
from unetlm.sweep.memory import Memory, plan_key, planned_memory
from unetlm.sweep.slurm import active, require_submitit, sbatch_script, submit
from unetlm.sweep.spec import SweepError, SweepSpec

EXECUTORS = ("local", "slurm")


def plan_sweep(spec: SweepSpec, out: str | Path, where: str = "sweep") -> SweepDir:
    """The sweep's runs and data, in a SweepDir object for ``out`` (nothing written)."""
    runs = expand(spec, where)
    data = unstructure(spec.data) if spec.data is not None else unstructure(runs[0].recipe().data)
    return SweepDir(Path(out), spec, runs, data)


def plan_memory(sweep: SweepDir, progress: bool = True) -> dict[str, Memory]:
    """Every run's planned memory per device (runs of one model and batch planned once)."""
    plans: dict[str, Memory] = {}
    memory = {}
    for i, run in enumerate(sweep.runs):
        recipe = run.recipe()
        key = plan_key(recipe)
        if key not in plans:
            if progress:
                print(f"planning memory: {run.name} ({i + 1}/{len(sweep.runs)})", flush=True)
            plans[key] = planned_memory(recipe, sweep.spec.resources)
        memory[run.name] = plans[key]
    return memory


def refuse_misfits(memory: dict[str, Memory]) -> None:
    misfits = {name: m for name, m in memory.items() if not m.fits}
    if misfits:
        name, first = next(iter(misfits.items()))
        raise RunError(f"{len(misfits)} of {len(memory)} runs do not fit; nothing was started. {name}: {first.why}")


def run_table(sweep: SweepDir, memory: dict[str, Memory] | None = None) -> str:
    """One line per run: name, steps, training FLOPs, planned memory per device."""
    where = "GPU" if sweep.spec.resources.gpus else "process"
    head = ["run", "steps", "FLOPs", f"memory per {where} (GiB)"]
    rows = []
    for run in sweep.runs:
        flops = "-" if run.flops is None else sci(run.flops)
        cells = [run.name, f"{run.steps:,}", flops]
        if memory is not None:
            m = memory[run.name]
            cells.append(f"{m.total / 2**30:.2f} of {m.usable / 2**30:.1f}" if m.fits else "DOES NOT FIT")
        rows.append(cells)
    head = head[: len(rows[0])]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in rows])


def dry_run(sweep: SweepDir, executor: str, progress: bool = True) -> str:
    """The table of runs with their planned memory, each run's command and, for Slurm, the job
    script; RunError after it is shown if a run does not fit."""
    memory = plan_memory(sweep, progress)
    resources = sweep.spec.resources
    text = [f"sweep {sweep.spec.name or '(unnamed)'}: {len(sweep.runs)} runs into {sweep.root}", "", run_table(sweep, memory),
            "", "each run's command" + (" (on every node)" if resources.nodes > 1 else "") + ":"]
    for run in sweep.runs:
        args = train_args(run, sweep.run_dir(run.name))
        text.append("  " + shell_text(node_command(args, resources.gpus, resources.nodes, "NODE", "FIRST_NODE", "PORT")))
    if resources.nodes > 1:
        text.append("  (NODE: the node's SLURM_NODEID; FIRST_NODE: the first host of SLURM_JOB_NODELIST; PORT: one per job)")
    if executor == "slurm":
        text += ["", "the job script submitit would submit (one array task per run):", "",
                 sbatch_script(sweep, sweep.runs)]
    print("\n".join(text), flush=True)
    refuse_misfits(memory)
    return "\n".join(text)


def launch(sweep_dir: SweepDir, executor: str = "local", parallel: int | None = None, progress: bool = True,
           cluster: str = "slurm") -> Outcome | list:
    """Write the sweep directory and run (local) or submit (Slurm) its unfinished runs."""
    if executor != "local":
        require_submitit()
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise SweepError("--executor slurm submits with Slurm's sbatch, which is not on this machine's PATH: "
                             "run it where jobs are submitted (a login node), or add --dry-run to see the job script")
    sweep = SweepDir.create(sweep_dir.root, sweep_dir.spec, sweep_dir.runs, sweep_dir.data)
    resources = sweep.spec.resources
    if executor == "local":
        return run_local(sweep, resources.parallel if parallel is None else parallel, resources.gpus, progress)
    todo = [r for r in sweep.runs if not sweep.finished(r) and not active(sweep, r.name)]
    busy = [r.name for r in sweep.runs if active(sweep, r.name)]
    if busy and progress:
        print(f"{len(busy)} runs have a job queued or running; not submitted again: {', '.join(busy)}", flush=True)
    if not todo:
        return []
    refuse_misfits(plan_memory(SweepDir(sweep.root, sweep.spec, todo, sweep.data), progress))
    jobs = submit(sweep, todo, cluster)
    if progress:
        ids = ", ".join(f"{r.name}: {j.job_id}" for r, j in zip(todo, jobs))
        print(f"submitted {len(jobs)} jobs ({ids}); follow them with `unetlm sweep status {sweep.root}`", flush=True)
    return jobs

