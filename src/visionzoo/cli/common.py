"""What every command shares: the consoles, exit codes, options, printing results and failures."""
from __future__ import annotations

import csv
import functools
import inspect
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Annotated, Any, Optional, Protocol

import typer
from rich.console import Console
from rich.table import Table

from ..runtime.backends import Backend

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL, EXIT_NOTHING = 0, 1, 2, 3, 4

out = Console()
err = Console(stderr=True)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"


class RunPrecision(str, Enum):
    """Inference precisions a user can ask for (int8 is a property of a quantized file)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Runtime(str, Enum):
    """The runtimes that run exported files (and check quantized ones)."""

    auto = "auto"
    onnxruntime = "onnxruntime"
    openvino = "openvino"


INPUTS_HELP = ("Image files (video files for a video model), folders (searched recursively), globs "
               "('photos/**/*.jpg'), @LIST (a text file of paths, one per line) or a CSV with a 'path' column.")
WORKERS_HELP = ("Decoding processes (default: one per spare CPU core; 0 decodes in the main process). With "
                "--engine ray: model actors (default: as many as the load asks, up to half the CPUs).")
EXACT_HELP = ("Decode every image at full size: torchvision's preprocessing exactly. By default large "
              "JPEGs are decoded at a reduced scale first (much faster, nearly identical inputs).")
MAX_PIXELS_HELP = "Refuse images with more pixels than this (decompression bombs); 0 for no limit. Same as " \
    "--decode-limits pixels=N."
DECODE_LIMITS_HELP = ("The budget of each image decode, checked from the header before decoding: pixels (as stored, "
                      "default 178956970), resized (pixels once resized to the model's input, default 16777216), "
                      "bytes (memory of the decoded image and its RGB copy, default 512MiB), frames (that an "
                      "animation declares, default 10000). E.g. 'pixels=300M,bytes=2GiB'; none lifts a limit.")
MODEL_HELP = "NAME or NAME.TAG (default weights unless a tag is given), or a bundle folder."
RUN_MODEL_HELP = ("NAME or NAME.TAG (default weights unless a tag is given), a bundle folder, or an .onnx file "
                  "from `visionzoo export` / `visionzoo quantize`.")
BACKEND_HELP = ("torch, onnxruntime or openvino; auto: the fastest installed one whose top-1 agrees with float32 "
                "PyTorch, measured once per model and machine (cached; --verbose says what it chose and why). The "
                "runtimes export the model to ONNX once (cached).")
THREADS_HELP = ("Compute threads of the model, on every backend (default: the cores the decoding workers leave; "
                "workers + threads <= cores).")
PRECISION_HELP = ("fp32, bf16 (torch and openvino backends; fast on CPUs with AVX512-BF16/AMX), or auto: bf16 when "
                  "the hardware runs it natively and it is faster with the same answers, else fp32.")


# options several commands share, declared once
ModelArg = Annotated[str, typer.Option("--model", "-m", help="NAME or NAME.TAG (default weights unless a tag is "
                                       "given), a bundle folder, or an .onnx file from `visionzoo export` / "
                                       "`visionzoo quantize`.")]
WeightsFile = Annotated[Optional[str], typer.Option("--weights", "-w", help="A local checkpoint file to load "
                                                    "instead.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1)]
Workers = Annotated[Optional[int], typer.Option("--workers", "-j", min=0, help=WORKERS_HELP)]
Exact = Annotated[bool, typer.Option("--exact", help=EXACT_HELP)]
MaxPixels = Annotated[Optional[int], typer.Option("--max-pixels", min=0, help=MAX_PIXELS_HELP)]
WAIT_HELP = "When another run is writing the same output, wait for it to finish instead of stopping with an " \
    "error that names it."
Wait = Annotated[bool, typer.Option("--wait", help=WAIT_HELP)]
DecodeLimitsText = Annotated[Optional[str], typer.Option("--decode-limits", metavar="KEY=VALUE,...",
                                                         help=DECODE_LIMITS_HELP)]
Device = Annotated[str, typer.Option("--device", help="Torch device to run the model on (cpu, cuda, cuda:1, mps).")]
BackendChoice = Annotated[Backend, typer.Option("--backend", help=BACKEND_HELP)]
Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help=THREADS_HELP)]
PrecisionChoice = Annotated[RunPrecision, typer.Option("--precision", help=PRECISION_HELP)]


def say(text: str) -> None:
    """A line on stdout, printed as is (no markup or wrapping)."""
    out.print(text, highlight=False, soft_wrap=True)


def note(text: str) -> None:
    """A line on stderr, printed as is."""
    err.print(text, highlight=False, soft_wrap=True)


def set_torch_threads(threads: int | None) -> None:
    """--threads for the torch backend, whose thread count is process-wide (the runtimes get theirs)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


class Failed(Protocol):
    # read-only members, so that frozen dataclasses (data.inputs.Failure) match
    @property
    def path(self) -> str: ...

    @property
    def reason(self) -> str: ...


def report_failure(failure: Failed) -> None:
    err.print(f"[red]skipped[/red] {failure.path}: {failure.reason}", highlight=False, soft_wrap=True)


def exit_for_failures(done: int, failures: Sequence[Failed], verb: str) -> None:
    """Print a summary of what failed, grouped by reason, and exit 3 (partial) or 4 (nothing done)."""
    if not failures:
        return
    kinds = Counter(f.reason.split(" (")[0].split(";")[0] for f in failures)
    summary = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    note(f"{done} {verb}, {len(failures)} failed: {summary}")
    raise typer.Exit(EXIT_NOTHING if done == 0 else EXIT_PARTIAL)


def decode_limits(text: str | None, max_pixels: int | None = None):
    """--decode-limits (applied to the defaults), then --max-pixels (0: no pixel limit) over it."""
    from ..data.images import DEFAULT_LIMITS, DecodeLimits

    limits = DecodeLimits.parse(text) if text else DEFAULT_LIMITS
    if max_pixels is not None:
        limits = DecodeLimits.parse(f"pixels={max_pixels}", limits)
    return limits


def with_inference_options(command: Callable[..., None] | None = None, *,
                           batch_size: int = 32) -> Callable[..., Any]:
    """`command` with the options every inference command shares (--batch-size, --workers, --exact,
    --max-pixels, --decode-limits, --device, --backend, --threads, --precision) added to its signature; it
    receives them as one `options: InferenceOptions` (and torch's own thread count is set for --threads).
    `@with_inference_options(batch_size=N)` gives the command another default batch size."""
    if command is None:
        return functools.partial(with_inference_options, batch_size=batch_size)
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in (
            ("batch_size", BatchSize, batch_size), ("workers", Workers, None), ("exact", Exact, False),
            ("max_pixels", MaxPixels, None), ("limits", DecodeLimitsText, None), ("device", Device, "cpu"),
            ("backend", BackendChoice, Backend.AUTO), ("threads", Threads, None),
            ("precision", PrecisionChoice, RunPrecision.auto))]
    names = [p.name for p in shared]

    @functools.wraps(command)
    def run(**kwargs: Any) -> None:
        from ..runtime.options import InferenceOptions

        given = {name: kwargs.pop(name) for name in names}
        set_torch_threads(given["threads"])
        options = InferenceOptions(batch_size=given["batch_size"], num_workers=given["workers"],
                                   fast=not given["exact"], limits=decode_limits(given["limits"], given["max_pixels"]),
                                   device=given["device"], backend=given["backend"], threads=given["threads"],
                                   precision=given["precision"].value)
        command(options=options, **kwargs)

    own = [p for p in inspect.signature(command).parameters.values() if p.name != "options"]
    run.__signature__ = inspect.Signature([*own, *shared])  # type: ignore[attr-defined]
    run.__annotations__ = {**{p.name: p.annotation for p in own}, **{p.name: p.annotation for p in shared}}
    return run


def model_arg(model: str, weights: str | None):
    """What predict and embed run: the name, bundle or .onnx file itself (the backend opens it), or
    the model with a checkpoint loaded from --weights."""
    if weights is None:
        return model
    from ..factory import create_model

    return create_model(model, weights=weights)


def fmt_number(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


# -- writing predictions -----------------------------------------------------------------------

class PredictionWriter:
    """Prints predictions (objects with `path`, `top` and `to_dict()`) in the chosen format: jsonl and
    csv stream one result at a time, table and json collect them and print at the end."""

    TABLE_COLUMNS: tuple[str, ...] = ("path", "rank", "label", "probability", "index")
    CSV_HEADER: tuple[str, ...] = ("path", "rank", "index", "label", "probability")

    def __init__(self, fmt: OutputFormat):
        self.fmt = fmt
        self.items: list[dict[str, Any]] = []
        self.table = Table(*self.TABLE_COLUMNS)
        self.csv = csv.writer(sys.stdout) if fmt is OutputFormat.csv else None
        if self.csv is not None:
            self.csv.writerow(self.CSV_HEADER)

    def add(self, p: Any) -> None:
        if self.fmt is OutputFormat.table:
            for r, t in enumerate(p.top):
                self.table.add_row(p.path if r == 0 else "", str(r + 1), t.label, f"{t.probability:.4f}",
                                   str(t.index))
            self.table.add_section()
        elif self.fmt is OutputFormat.json:
            self.items.append(p.to_dict())
        elif self.fmt is OutputFormat.jsonl:
            sys.stdout.write(json.dumps(p.to_dict()) + "\n")
            sys.stdout.flush()
        elif self.csv is not None:
            for r, t in enumerate(p.top):
                self.csv.writerow([p.path, r + 1, t.index, t.label, f"{t.probability:.6f}"])

    def close(self) -> None:
        if self.fmt is OutputFormat.table and self.table.row_count:
            out.print(self.table)
        elif self.fmt is OutputFormat.json:
            sys.stdout.write(json.dumps(self.items, indent=2) + "\n")
        sys.stdout.flush()



class VideoPredictionWriter(PredictionWriter):
    """Video predictions (`tasks/video.py`): the classes averaged over the clips, then each clip's. The
    table and CSV get a `clip` column (`all` for the average) and the clip's start and end in seconds;
    JSON and JSONL hold the clips in each record."""

    TABLE_COLUMNS = ("path", "clip", "seconds", "rank", "label", "probability", "index")
    CSV_HEADER = ("path", "clip", "start", "end", "rank", "index", "label", "probability")

    def add(self, p: Any) -> None:
        rows = [("all", None, None, p.top)] + [(str(c.index + 1), c.start, c.end, c.top) for c in p.clips]
        if self.fmt is OutputFormat.table:
            for clip, start, end, top in rows:
                seconds = "" if start is None else f"{start:.2f}-{end:.2f}"
                for r, t in enumerate(top):
                    first = r == 0
                    self.table.add_row(p.path if clip == "all" and first else "", clip if first else "",
                                       seconds if first else "", str(r + 1), t.label, f"{t.probability:.4f}",
                                       str(t.index))
            self.table.add_section()
        elif self.csv is not None:
            for clip, start, end, top in rows:
                for r, t in enumerate(top):
                    self.csv.writerow([p.path, clip, "" if start is None else f"{start:.3f}",
                                       "" if end is None else f"{end:.3f}", r + 1, t.index, t.label,
                                       f"{t.probability:.6f}"])
        else:
            super().add(p)
