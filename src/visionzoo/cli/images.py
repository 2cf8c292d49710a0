"""`predict`, `embed` and `segment`: images in, labels, vectors or masks out."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..data.images import DEFAULT_MAX_PIXELS
from ..registry import DEFAULT_MODEL
from ..runtime.backends import Backend
from .common import (
    INPUTS_HELP,
    BackendChoice,
    BatchSize,
    Device,
    Exact,
    MaxPixels,
    ModelArg,
    OutputFormat,
    PrecisionChoice,
    PredictionWriter,
    RunPrecision,
    Threads,
    WeightsFile,
    Workers,
    exit_for_failures,
    inference_options,
    model_arg,
    note,
    out,
    report_failure,
)


def predict(
    paths: list[str] = typer.Argument(..., help=INPUTS_HELP),
    model: ModelArg = DEFAULT_MODEL,
    weights: WeightsFile = None,
    topk: int = typer.Option(5, "--topk", "-k", min=1, help="How many classes to show per image."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Output format (jsonl and csv "
                                     "stream one result at a time, for any number of images)."),
    batch_size: BatchSize = 32,
    workers: Workers = None,
    exact: Exact = False,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    device: Device = "cpu",
    backend: BackendChoice = Backend.AUTO,
    threads: Threads = None,
    precision: PrecisionChoice = RunPrecision.fp32,
) -> None:
    """Classify images and print the top classes of each."""
    from ..tasks.predict import Prediction, iter_predict

    options = inference_options(batch_size=batch_size, workers=workers, exact=exact, max_pixels=max_pixels,
                                device=device, backend=backend, threads=threads, precision=precision)
    failures, done = [], 0
    writer = PredictionWriter(fmt)
    for result in iter_predict(paths, model_arg(model, weights), topk=topk, options=options):
        if isinstance(result, Prediction):
            writer.add(result)
            done += 1
        else:
            failures.append(result)
            report_failure(result)
    writer.close()
    exit_for_failures(done, failures, "predicted")


def embed(
    paths: list[str] = typer.Argument(..., help=INPUTS_HELP),
    out_file: str = typer.Option(..., "--out", "-o", help="Output file: .npy (with a <stem>.paths.txt list of "
                                 "paths) or .parquet (path and embedding columns)."),
    model: ModelArg = DEFAULT_MODEL,
    weights: WeightsFile = None,
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Embed an intermediate stage instead (its "
                                        "index in feature_info, negative from the deepest, or its module name), "
                                        "global-average pooled; needs the torch backend."),
    normalize: bool = typer.Option(False, "--normalize", help="L2-normalise each vector."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", min=1, help="Images per saved chunk of a "
                                             "resumable run (a multiple of --batch-size; default 8 batches)."),
    restart: bool = typer.Option(False, "--restart", help="Discard the partial results of an interrupted run "
                                 "instead of resuming it."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show a progress bar "
                                            "(default: when stderr is a terminal)."),
    batch_size: BatchSize = 32,
    workers: Workers = None,
    exact: Exact = False,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    device: Device = "cpu",
    backend: BackendChoice = Backend.AUTO,
    threads: Threads = None,
    precision: PrecisionChoice = RunPrecision.fp32,
) -> None:
    """Write one embedding vector per image (pooled pre-logits, or a pooled stage); resumable."""
    from ..tasks.embed import embed as run_embed
    from ..tasks.embed import sidecar_path
    from .common import err

    options = inference_options(batch_size=batch_size, workers=workers, exact=exact, max_pixels=max_pixels,
                                device=device, backend=backend, threads=threads, precision=precision)
    result = run_embed(paths, model_arg(model, weights), out=out_file, layer=layer, normalize=normalize,
                       chunk_size=chunk_size, resume=not restart,
                       progress=err.is_terminal if progress is None else progress, options=options)
    for failure in result.failures:
        report_failure(failure)
    written = result.out
    extra = f" (+ {sidecar_path(written).name})" if written is not None and written.suffix.lower() == ".npy" else ""
    note(f"wrote {len(result)} embeddings of dimension {result.dim} to {written}{extra}")
    exit_for_failures(len(result), result.failures, "embedded")


def segment(
    paths: list[str] = typer.Argument(..., help=INPUTS_HELP),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for masks/ (class-index PNGs in the VOC colours, "
                                 "at each image's size), overlays/ and segments.jsonl."),
    model: str = typer.Option("lraspp_mobilenet_v3_large", "--model", "-m", help="A segmentation model: NAME or "
                              "NAME.TAG (`visionzoo models --task segmentation`), a bundle fine-tuned on masks, or "
                              "an .onnx file from `visionzoo export`."),
    weights: WeightsFile = None,
    overlay: bool = typer.Option(True, "--overlay/--no-overlay", help="Also draw each image with its classes "
                                 "coloured and a legend."),
    overlay_size: int = typer.Option(1024, "--overlay-size", min=0, help="Longer side of the overlays in pixels "
                                     "(0: the image's own size)."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="How the per-image rows (the "
                                     "share of each class) are printed; jsonl and csv stream."),
    batch_size: BatchSize = 4,
    workers: Workers = None,
    exact: Exact = False,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    device: Device = "cpu",
    backend: BackendChoice = Backend.AUTO,
    threads: Threads = None,
    precision: PrecisionChoice = RunPrecision.fp32,
) -> None:
    """Segment images: a class mask and an overlay per image, and the share of each class."""
    from rich.table import Table

    from ..tasks.segment import Segmentation, iter_segment

    options = inference_options(batch_size=batch_size, workers=workers, exact=exact, max_pixels=max_pixels,
                                device=device, backend=backend, threads=threads, precision=precision)
    runner = options.open(model_arg(model, weights))
    classes = list(runner.categories or [f"class_{i}" for i in range(runner.num_classes)])
    failures, done, rows = [], 0, []
    table = Table("path", "size", "classes (share of pixels)", "mask")
    writer = csv.writer(sys.stdout) if fmt is OutputFormat.csv else None
    if writer is not None:
        writer.writerow(["path", "width", "height", "mask", "overlay", *classes])
    for result in iter_segment(paths, runner, out_dir, overlay=overlay, overlay_size=overlay_size, options=options):
        if not isinstance(result, Segmentation):
            failures.append(result)
            report_failure(result)
            continue
        done += 1
        if fmt is OutputFormat.table:
            shares = ", ".join(f"{c} {f:.1%}" for c, f in list(result.fractions.items())[:4])
            table.add_row(result.path, f"{result.width}x{result.height}", shares, result.mask or "-")
        elif fmt is OutputFormat.json:
            rows.append(result.to_dict())
        elif fmt is OutputFormat.jsonl:
            sys.stdout.write(json.dumps(result.to_dict()) + "\n")
            sys.stdout.flush()
        elif writer is not None:
            writer.writerow([result.path, result.width, result.height, result.mask, result.overlay or "",
                             *(f"{result.fractions.get(c, 0.0):.6f}" for c in classes)])
    if fmt is OutputFormat.table and table.row_count:
        out.print(table)
    elif fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    sys.stdout.flush()
    if done:
        note(f"wrote {done} masks to {out_dir / 'masks'}" + (f" and overlays to {out_dir / 'overlays'}" if overlay
                                                               else ""))
    exit_for_failures(done, failures, "segmented")
