"""`tensorgate models optimize|jobs|job|compare`: cheaper versions of a model, made and
measured by the registry, and compared with the version they came from.

    tensorgate models optimize digits@production --method int8-dynamic
    tensorgate models optimize tinylm:1 --method prune --sparsity 0.5 --method int8-dynamic
    tensorgate models jobs digits
    tensorgate models compare digits:1 digits:2

`optimize` starts a job and, unless --no-wait, follows its progress and prints the
comparison when it is done. These commands join the `models` group.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from tensorgate.registry.v1 import registry_pb2
from tensorgate.registry_client import AsyncRegistryClient

from launcher import output
from launcher.options import DEFAULT_ADDRESS, Address, ApiKey, Ref, UsageError, with_registry

optimize_app = typer.Typer(rich_markup_mode=None)

Job = registry_pb2.OptimizationJob
STATES = {Job.QUEUED: "queued", Job.RUNNING: "running", Job.DONE: "done", Job.FAILED: "failed"}

# The rows `compare` shows, in order, when either version has the figure.
FIGURES = (
    ("artifact_bytes", "artifact size (bytes)"),
    ("weights_file_bytes", "weights file (bytes)"),
    ("param_bytes", "parameter bytes in memory"),
    ("nonzero_param_fraction", "non-zero parameters"),
    ("latency_c1_p50_ms", "latency p50, concurrency 1 (ms)"),
    ("latency_c1_p99_ms", "latency p99, concurrency 1 (ms)"),
    ("latency_c8_p50_ms", "latency p50, concurrency 8 (ms)"),
    ("latency_c8_p99_ms", "latency p99, concurrency 8 (ms)"),
    ("accuracy", "held-out accuracy"),
    ("heldout_loss_per_byte", "held-out loss (nats/byte)"),
)


def steps_of(methods: list[str], sparsity: float | None) -> list[tuple[str, dict[str, str]]]:
    """--method given in order; --sparsity is every prune step's parameter."""
    if not methods:
        raise UsageError("--method: name at least one (int8-dynamic, prune)")
    steps: list[tuple[str, dict[str, str]]] = []
    for method in methods:
        parameters: dict[str, str] = {}
        if method == "prune":
            if sparsity is None:
                raise UsageError("--method prune needs --sparsity, e.g. --sparsity 0.5")
            parameters["sparsity"] = repr(sparsity)
        steps.append((method, parameters))
    if sparsity is not None and "prune" not in methods:
        # Said rather than ignored: the caller meant some step to prune.
        raise UsageError("--sparsity is the prune step's: add --method prune (in the order wanted)")
    return steps


def _describe(job: registry_pb2.OptimizationJob) -> str:
    steps = ", ".join(
        s.method + "".join(f" {k}={v}" for k, v in sorted(s.parameters.items())) for s in job.steps
    )
    return f"{job.model}:{job.parent_version} <- {steps}"


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _delta(derived: float, parent: float) -> str:
    change = derived - parent
    relative = f" ({change / parent:+.1%})" if parent else ""
    return f"{'+' if change >= 0 else ''}{_number(change)}{relative}"


def compare_rows(
    first: registry_pb2.ModelVersion, second: registry_pb2.ModelVersion
) -> tuple[list[tuple[str, str, str, str]], str]:
    """FIGURE FIRST SECOND DELTA rows. When `second` derives from `first`, `first`'s
    figures are the ones measured beside `second` in its job (the same run)."""
    derives = second.model == first.model and second.lineage.parent_version == first.version
    same_run = derives and any(key.startswith("parent.") for key in second.facts)
    rows = []
    for key, label in FIGURES:
        a = second.facts.get(f"parent.{key}") if same_run else None
        if a is None:
            a = first.facts.get(key)
        b = second.facts.get(key)
        if a is None and b is None:
            continue
        rows.append(
            (
                label,
                "-" if a is None else _number(a),
                "-" if b is None else _number(b),
                _delta(b, a) if a is not None and b is not None else "",
            )
        )
    if "quality_loss" in second.facts:
        rows.append(("quality loss vs parent", "", _number(second.facts["quality_loss"]), ""))
    lineage = second.lineage
    note = ""
    if lineage.parent_version:
        params = ", ".join(f"{k}={v}" for k, v in sorted(lineage.parameters.items()))
        note = f"{second.model}:{second.version} = {lineage.transformation} of version "
        note += f"{lineage.parent_version} ({params})"
        if same_run:
            note += f"; {first.model}:{first.version}'s figures are from the same run"
    return rows, note


def print_comparison(first: registry_pb2.ModelVersion, second: registry_pb2.ModelVersion) -> None:
    rows, note = compare_rows(first, second)
    columns = (
        "FIGURE",
        f"{first.model}:{first.version}",
        f"{second.model}:{second.version}",
        "DELTA",
    )
    output.table(columns, rows, empty="no measured facts to compare")
    if note and output.stdout_is_terminal():
        Console().print(note, style="dim", highlight=False, markup=False)


async def _follow(registry: AsyncRegistryClient, job: registry_pb2.OptimizationJob) -> Job:
    """Shows the job's progress (a bar on a terminal, stage lines on stderr otherwise)."""
    console = Console(stderr=True)
    last = job
    if not console.is_terminal:
        async for last in registry.wait_optimization_job(job.id):
            print(
                f"{last.id}\t{STATES.get(last.state, '?')}\t{last.progress:.0%}\t{last.stage}",
                file=sys.stderr,
            )
        return last
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(job.id, total=1.0)
        async for last in registry.wait_optimization_job(job.id):
            bar.update(task, completed=last.progress, description=f"{last.id}: {last.stage}")
    return last


@optimize_app.command()
def optimize(
    ref: Ref,
    method: Annotated[
        list[str],
        typer.Option(
            "--method",
            help="int8-dynamic or prune; repeat to chain them, applied in the order given",
        ),
    ],
    sparsity: Annotated[
        float | None, typer.Option(help="prune: the fraction of weights to zero, in (0, 1)")
    ] = None,
    description: Annotated[str, typer.Option(help="the derived version's description")] = "",
    latency_calls: Annotated[
        int, typer.Option(help="calls behind each latency figure (0: the registry's default)")
    ] = 0,
    wait: Annotated[bool, typer.Option(help="follow the job until it ends")] = True,
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Derive a cheaper version of a model (a registry job) and measure it beside its
    parent: size, parameter bytes, latency through a worker, held-out quality."""
    steps = steps_of(method, sparsity)

    async def run(
        registry: AsyncRegistryClient,
    ) -> tuple[Job, tuple[registry_pb2.ModelVersion, registry_pb2.ModelVersion] | None]:
        job = await registry.start_optimization(
            ref, steps, description=description, latency_calls=latency_calls
        )
        Console(stderr=True).print(f"started {job.id}: {_describe(job)}", highlight=False)
        if not wait:
            return job, None
        job = await _follow(registry, job)
        if job.state != Job.DONE:
            return job, None
        parent = await registry.get_version(job.model, job.parent_version)
        return job, (parent, await registry.get_version(job.model, job.result_version))

    job, versions = with_registry(address, api_key, run)
    if not wait:
        output.result(f"{job.id} queued", (job.id, "queued"))
        return
    if job.state == Job.FAILED:
        Console(stderr=True).print(f"{job.id} failed: {job.error}", highlight=False, markup=False)
        raise typer.Exit(1)
    assert versions is not None
    output.result(
        f"{job.model}:{job.result_version} derived from {job.model}:{job.parent_version}",
        (job.id, f"{job.model}:{job.result_version}"),
    )
    print_comparison(*versions)


@optimize_app.command()
def jobs(
    model: Annotated[str, typer.Argument(metavar="NAME", help="only this model's")] = "",
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Optimization jobs, newest first: ID STATE PROGRESS STAGE RESULT FROM ERROR."""
    found = with_registry(address, api_key, lambda r: r.list_optimization_jobs(model))
    rows = [
        (
            j.id,
            STATES.get(j.state, "?"),
            f"{j.progress:.0%}",
            j.stage,
            f"{j.model}:{j.result_version}" if j.result_version else "-",
            _describe(j),
            j.error,
        )
        for j in found
    ]
    columns = ("ID", "STATE", "PROGRESS", "STAGE", "RESULT", "FROM", "ERROR")
    output.table(columns, rows, empty="no optimization jobs")


@optimize_app.command()
def job(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="the job's id")],
    wait: Annotated[bool, typer.Option(help="follow the job until it ends")] = False,
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """One optimization job: its state, stage and progress (or why it failed)."""

    async def fetch(registry: AsyncRegistryClient) -> Job:
        found = await registry.get_optimization_job(job_id)
        return await _follow(registry, found) if wait else found

    found = with_registry(address, api_key, fetch)
    state = STATES.get(found.state, "?")
    detail = found.error or found.stage
    output.result(
        f"{found.id} {state} ({found.progress:.0%}): {detail}",
        (found.id, state, f"{found.progress:.3f}", detail, str(found.result_version)),
    )
    if found.state == Job.FAILED:
        raise typer.Exit(1)


@optimize_app.command()
def compare(
    first: Annotated[str, typer.Argument(metavar="REF", help="name:3, name@alias or name")],
    second: Annotated[str, typer.Argument(metavar="REF", help="the version to set beside it")],
    address: Address = DEFAULT_ADDRESS,
    api_key: ApiKey = None,
) -> None:
    """Two versions' measured facts side by side, with the delta of the second."""

    async def fetch(
        registry: AsyncRegistryClient,
    ) -> tuple[registry_pb2.ModelVersion, registry_pb2.ModelVersion]:
        return (
            await registry.resolve_model_ref(first),
            await registry.resolve_model_ref(second),
        )

    print_comparison(*with_registry(address, api_key, fetch))
