"""`predict` and `embed`: images in, labels or vectors out."""
from __future__ import annotations

from typing import Optional

import typer

from ..registry import DEFAULT_MODEL
from ..runtime.backends import Backend
from .common import (
    INPUTS_HELP,
    BackendChoice,
    BatchSize,
    DecodeLimitsText,
    Device,
    Exact,
    MaxPixels,
    ModelArg,
    OutputFormat,
    PrecisionChoice,
    PredictionWriter,
    RunPrecision,
    Threads,
    Wait,
    WeightsFile,
    Workers,
    exit_for_failures,
    inference_options,
    model_arg,
    note,
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
    max_pixels: MaxPixels = None,
    limits: DecodeLimitsText = None,
    device: Device = "cpu",
    backend: BackendChoice = Backend.AUTO,
    threads: Threads = None,
    precision: PrecisionChoice = RunPrecision.fp32,
) -> None:
    """Classify images and print the top classes of each."""
    from ..tasks.predict import Prediction, iter_predict

    options = inference_options(batch_size=batch_size, workers=workers, exact=exact, max_pixels=max_pixels,
                                device=device, backend=backend, threads=threads, precision=precision, limits=limits)
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
    out_file: str = typer.Option(..., "--out", "-o", help="Output file: .npy (with <stem>.paths.jsonl, its paths "
                                 "as one JSON string per line) or .parquet (path and embedding columns)."),
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
    wait: Wait = False,
    batch_size: BatchSize = 32,
    workers: Workers = None,
    exact: Exact = False,
    max_pixels: MaxPixels = None,
    limits: DecodeLimitsText = None,
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
                                device=device, backend=backend, threads=threads, precision=precision, limits=limits)
    result = run_embed(paths, model_arg(model, weights), out=out_file, layer=layer, normalize=normalize,
                       chunk_size=chunk_size, resume=not restart, wait=wait,
                       progress=err.is_terminal if progress is None else progress, options=options)
    for failure in result.failures:
        report_failure(failure)
    written = result.out
    extra = f" (+ {sidecar_path(written).name})" if written is not None and written.suffix.lower() == ".npy" else ""
    note(f"wrote {len(result)} embeddings of dimension {result.dim} to {written}{extra}")
    exit_for_failures(len(result), result.failures, "embedded")
