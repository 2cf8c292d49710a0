"""Shipping a model: `export`, `quantize`, `prune`, `benchmark`, `serve`.

Errors are visionzoo errors (`InputError`, `ExportError`, `MissingDependencyError`, ...):
`cli.main` prints them as one line and exits 1, like every other command.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..data.images import DEFAULT_MAX_PIXELS
from ..runtime.backends import Backend
from ..runtime.export import TOLERANCE, ExportFormat
from ..tasks.quantize import QuantMode
from .common import (
    MODEL_HELP,
    RUN_MODEL_HELP,
    BackendChoice,
    DecodeLimitsText,
    Exact,
    MaxPixels,
    PrecisionChoice,
    RunPrecision,
    Runtime,
    Threads,
    Wait,
    decode_limits,
    err,
    out,
    report_failure,
    say,
    set_torch_threads,
)


def export(
    model: str = typer.Argument(..., help=MODEL_HELP),
    fmt: ExportFormat = typer.Option(ExportFormat.ONNX.value, "--format", "-f",
                                     help="onnx (onnxruntime, openvino, other runtimes), torchscript, or pt2 "
                                          "(torch.export)."),
    out_file: Path = typer.Option(..., "--out", "-o", help="The file to write."),
    input_size: Optional[int] = typer.Option(None, "--input-size", min=8, help="Square input size (default: the "
                                             "preprocessing's crop; RAFT: N x N frames instead of 360 x 640); the "
                                             "batch size stays free."),
    tolerance: float = typer.Option(TOLERANCE, "--tolerance", min=0.0, help="Largest accepted difference from "
                                    "PyTorch, relative to each output's range."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Run the written file and compare it with "
                                "PyTorch (no file is left when it differs)."),
    wait: Wait = False,
) -> None:
    """Export a model (with its classes and preprocessing) to ONNX, TorchScript or PT2, verified against PyTorch."""
    from ..runtime.export import describe, export_model

    result = export_model(model, fmt, out_file, input_size=input_size, verify=verify, tolerance=tolerance, wait=wait)
    say(describe(result))


def quantize(
    model: str = typer.Argument(..., help=MODEL_HELP),
    calibration: Optional[str] = typer.Option(None, "--calibration", "-c", help="Your images to calibrate on "
                                              "(a folder, glob, @LIST or CSV; a few hundred typical ones). "
                                              "Needed for static quantization."),
    out_file: Path = typer.Option(..., "--out", "-o", help="The int8 model file to write (.onnx)."),
    mode: QuantMode = typer.Option(QuantMode.AUTO.value, "--mode",
                                         help="static: calibrated activation ranges (convolutional networks); "
                                              "dynamic: ranges per batch (ViT, Swin); auto: chosen from where "
                                              "the multiply-adds are."),
    num_images: int = typer.Option(300, "--num-images", "-n", min=1, help="Calibration images used (a random "
                                   "sample of a larger set)."),
    backend: Runtime = typer.Option(Runtime.auto.value, "--backend",
                                          help="The runtime that checks the result (the file runs on both)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare top-1 with float32 on up to 64 of the "
                               "calibration images."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration sample."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=0, help="Image decoding processes."),
    limits: DecodeLimitsText = None,
    max_pixels: MaxPixels = None,
    wait: Wait = False,
) -> None:
    """Quantize a model to int8 (ONNX, QDQ) on your own images; run it with --backend onnxruntime or openvino."""
    from ..tasks.quantize import quantize as run

    result = run(model, calibration, out_file, backend=backend.value, mode=mode.value, num_images=num_images,
                 seed=seed, check=check, num_workers=workers, limits=decode_limits(limits, max_pixels), wait=wait)
    for f in result.failures[:10]:
        report_failure(f)
    if len(result.failures) > 10:
        err.print(f"... and {len(result.failures) - 10} more unreadable calibration images", highlight=False)
    say(result.describe())


def prune(
    bundle: Path = typer.Argument(..., help="A bundle written by `visionzoo finetune` (or its run folder)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run folder: OUT/bundle is the pruned, fine-tuned "
                                 "model, OUT/prune.json the report."),
    ratio: float = typer.Option(0.3, "--ratio", "-r", help="Share of channels removed from every group of "
                                "coupled convolutions (0 < ratio < 1)."),
    finetune_epochs: int = typer.Option(3, "--finetune-epochs", "-e", min=0, help="Epochs of full fine-tuning "
                                        "to recover the accuracy (0: none)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Training data (default: what the bundle was "
                                        "trained on)."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation data (default: the bundle's split)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Fine-tuning learning rate (default: finetune's)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=0, help="Image decoding processes."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Remove channels structurally (torch-pruning), fine-tune to recover; report size, speed and accuracy."""
    from ..tasks.prune import prune as run

    result = run(bundle, ratio, out=out_dir, finetune_epochs=finetune_epochs, data=data, val=val, lr=lr,
                 batch_size=batch_size, progress=not quiet, num_workers=workers)
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    for line in result.lines():
        say(line)
    say(f"bundle: {result.bundle}")


def benchmark(
    model: str = typer.Argument(..., help=RUN_MODEL_HELP),
    batch: Optional[str] = typer.Option(None, "--batch", help="Batch sizes, comma-separated (default 1,32; 1,4 for "
                                        "segmentation models)."),
    backends: Optional[str] = typer.Option(None, "--backends", help="Comma-separated: torch, onnxruntime, "
                                           "openvino (default: every installed one)."),
    precision: str = typer.Option("fp32", "--precision", help="Comma-separated: fp32, bf16 (torch, openvino), "
                                  "int8 (an int8 .onnx file from `visionzoo quantize`)."),
    data: Optional[Path] = typer.Option(None, "--data", help="ImageFolder tree or path,label CSV: also measure "
                                        "accuracy on each backend."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Score at most this many images of --data."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Compute threads (every backend; "
                                          "default: one per core)."),
    repeats: int = typer.Option(10, "--repeats", min=1, help="Timed runs per batch size (median)."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed runs first."),
    json_file: Optional[str] = typer.Option(None, "--json", help="Also write the results (and the machine) as "
                                            "JSON to this file ('-': JSON on stdout instead of the table)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=0, help="Decoding processes for --data."),
) -> None:
    """Throughput, latency (p50/p95), peak memory, model size (and accuracy) per backend, precision and batch."""
    from ..tasks.benchmark import benchmark as run

    result = run(model, batches=batch, backends=backends, precisions=precision, data=data, threads=threads,
                 repeats=repeats, warmup=warmup, limit=limit, num_workers=workers)
    if json_file == "-":
        sys.stdout.write(result.to_json() + "\n")
        return
    if out.is_terminal:
        say(f"machine: {result.machine_text}")
        out.print(result.table())
        for note in result.notes():
            say(note)
    else:
        for line in result.lines():
            sys.stdout.write(line + "\n")
    if json_file:
        written = result.write_json(json_file)
        err.print(f"wrote {written}", highlight=False, soft_wrap=True)


def serve(
    model: str = typer.Argument(..., help=RUN_MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="Port (0: any free one)."),
    backend: BackendChoice = Backend.AUTO,
    threads: Threads = None,
    precision: PrecisionChoice = RunPrecision.auto,
    topk: int = typer.Option(5, "--topk", "-k", min=1, max=100, help="Classes returned per image."),
    max_bytes: int = typer.Option(20 * 2**20, "--max-bytes", min=1, help="Largest accepted request body (bytes; "
                                  "checked while reading)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Images per model call at most."),
    max_delay_ms: float = typer.Option(5.0, "--max-delay-ms", min=0.0, help="How long the first image of a "
                                       "batch waits for others (milliseconds)."),
    max_queue: int = typer.Option(32, "--max-queue", min=1, help="Requests in the server at once (decoding, "
                                  "queued, running); more are answered 503 with Retry-After at once. About one "
                                  "batch: a request then waits at most for the batch running and its own."),
    decode_workers: Optional[int] = typer.Option(None, "--decode-workers", min=1, help="Images decoded at once "
                                                 "(default: one per core, at most 4)."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.01, help="Seconds for a request's "
                                         "head to arrive (408 or the connection closed after)."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", min=0.01, help="Seconds for a request's body "
                                       "to arrive (408 after)."),
    keepalive_timeout: float = typer.Option(5.0, "--keepalive-timeout", min=0.01, help="Idle keep-alive "
                                            "connections are closed after this many seconds."),
    shutdown_timeout: float = typer.Option(30.0, "--shutdown-timeout", min=0.0, help="On Ctrl-C or SIGTERM, "
                                           "in-flight requests get this long to finish."),
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    exact: Exact = False,
    explain: bool = typer.Option(True, "--explain/--no-explain", help="Serve POST /explain (Grad-CAM)."),
) -> None:
    """Serve a model over HTTP, with a web page at /: POST /predict, POST /explain, /health, /ready, /info,
    /metrics."""
    from ..optional import require

    for module in ("starlette", "uvicorn", "prometheus_client", "python_multipart"):
        require(module)
    from ..tasks.serve import ServeSettings, server_url
    from ..tasks.serve import serve as run

    settings = ServeSettings(topk=topk, max_bytes=max_bytes, max_pixels=max_pixels or None, fast=not exact,
                             max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                             decode_workers=decode_workers, header_timeout=header_timeout, body_timeout=body_timeout,
                             keepalive_timeout=keepalive_timeout, shutdown_timeout=shutdown_timeout, explain=explain)

    def ready(server) -> None:
        service = server.config.app.state.service  # uvicorn keeps the application it was given
        err.print(f"serving {service.runner.describe()} on {server_url(server)}  (the page at /; POST /predict; "
                  f"Ctrl-C to stop)", highlight=False, soft_wrap=True)

    set_torch_threads(threads)
    run(model, host, port, backend=backend.value, threads=threads, precision=precision.value, settings=settings,
        on_ready=ready)
    err.print("stopped", highlight=False)
