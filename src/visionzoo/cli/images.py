"""`predict`, `embed`, `segment`, `detect` and `explain`: images in, labels, vectors, masks, boxes or heat maps out."""
from __future__ import annotations

import csv
import dataclasses
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..data.images import DEFAULT_MAX_PIXELS
from ..data.inputs import Failure
from ..errors import InputError
from ..registry import DEFAULT_MODEL
from ..runtime.options import InferenceOptions
from .common import (
    INPUTS_HELP,
    MaxPixels,
    ModelArg,
    OutputFormat,
    PredictionWriter,
    VideoPredictionWriter,
    Wait,
    WeightsFile,
    exit_for_failures,
    model_arg,
    note,
    out,
    report_failure,
    with_inference_options,
)


class Engine(str, Enum):
    local = "local"
    ray = "ray"


ENGINE_HELP = ("local: this machine; ray: a Ray cluster or a local Ray instance (pip install \"visionzoo[ray]\"), "
               "writing a folder of Parquet files (--out DIR.parquet, one row per image, resumable), with "
               "--workers model actors.")
CLIPS_HELP = ("Video models: evenly spaced clips per video, sampled as the weights were evaluated (default: the "
              "weights' own count); --batch-size then counts clips.")
ADDRESS_HELP = "With --engine ray: the cluster (auto, ray://HEAD:10001); default: a new local Ray instance."


@with_inference_options
def predict(
    paths: list[str] = typer.Argument(..., help=INPUTS_HELP),
    model: ModelArg = DEFAULT_MODEL,
    weights: WeightsFile = None,
    topk: int = typer.Option(5, "--topk", "-k", min=1, help="How many classes to show per image."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Output format (jsonl and csv "
                                     "stream one result at a time, for any number of images)."),
    engine: Engine = typer.Option(Engine.local, "--engine", help=ENGINE_HELP),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    out_dir: Optional[str] = typer.Option(None, "--out", "-o", help="With --engine ray: the output folder "
                                          "(DIR.parquet; a rerun fills in the images without a row)."),
    restart: bool = typer.Option(False, "--restart", help="With --engine ray: delete the rows already in --out "
                                 "and start over."),
    clips: Optional[int] = typer.Option(None, "--clips", min=1, help=CLIPS_HELP + " Each clip's top classes and "
                                        "their average are printed."),
    *,
    options: InferenceOptions,
) -> None:
    """Classify images (or videos, with a video model) and print the top classes of each (or, on Ray, write
    them to Parquet)."""
    from ..tasks.predict import iter_predict
    from ..tasks.video import VideoPrediction

    if engine is Engine.ray:
        if clips is not None:
            raise InputError("--clips is for video models, which run with the local engine")
        _on_ray(paths, model_arg(model, weights), out_dir, options, embed=False, topk=topk, address=address,
                restart=restart, progress=None)
        return
    if out_dir is not None or address is not None or restart:
        raise InputError("--out, --address and --restart go with --engine ray; the local predict prints its "
                         "results (--format jsonl or csv streams them, for any number of images)")

    failures, done = [], 0
    writer: PredictionWriter | None = None  # chosen by the first result: image or video predictions
    for result in iter_predict(paths, model_arg(model, weights), topk=topk, clips=clips, options=options):
        if isinstance(result, Failure):
            failures.append(result)
            report_failure(result)
            continue
        if writer is None:
            writer = (VideoPredictionWriter if isinstance(result, VideoPrediction) else PredictionWriter)(fmt)
        writer.add(result)
        done += 1
    (writer or PredictionWriter(fmt)).close()
    exit_for_failures(done, failures, "predicted")


@with_inference_options
def embed(
    paths: list[str] = typer.Argument(..., help=INPUTS_HELP),
    out_file: str = typer.Option(..., "--out", "-o", help="Output file: .npy (with <stem>.paths.jsonl, its paths "
                                 "as one JSON string per line) or .parquet (path and embedding columns); with "
                                 "--engine ray, a folder (DIR.parquet) of Parquet files."),
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
    engine: Engine = typer.Option(Engine.local, "--engine", help=ENGINE_HELP),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    clips: Optional[int] = typer.Option(None, "--clips", min=1, help=CLIPS_HELP + " A video's vector is the mean "
                                        "of its clips' pooled embeddings."),
    *,
    options: InferenceOptions,
) -> None:
    """Write one embedding vector per image (pooled pre-logits, or a pooled stage), or per video with a video
    model; resumable."""
    from ..tasks.embed import embed as run_embed
    from ..tasks.embed import sidecar_path
    from .common import err

    if engine is Engine.ray:
        if clips is not None:
            raise InputError("--clips is for video models, which run with the local engine")
        if chunk_size is not None:
            raise InputError("--chunk-size is the local engine's; on Ray each block of images is saved as it is done")
        _on_ray(paths, model_arg(model, weights), out_file, options, embed=True, layer=layer, normalize=normalize,
                address=address, restart=restart, progress=progress)
        return
    if address is not None:
        raise InputError("--address goes with --engine ray")

    result = run_embed(paths, model_arg(model, weights), out=out_file, layer=layer, normalize=normalize,
                       chunk_size=chunk_size, resume=not restart, wait=wait, clips=clips,
                       progress=err.is_terminal if progress is None else progress, options=options)
    for failure in result.failures:
        report_failure(failure)
    written = result.out
    extra = f" (+ {sidecar_path(written).name})" if written is not None and written.suffix.lower() == ".npy" else ""
    note(f"wrote {len(result)} embeddings of dimension {result.dim} to {written}{extra}")
    exit_for_failures(len(result), result.failures, "embedded")


@with_inference_options(batch_size=4)  # photo-sized inputs: 4 images at 520 x 693 already hold 90 MB of scores
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
    *,
    options: InferenceOptions,
) -> None:
    """Segment images: a class mask and an overlay per image, and the share of each class."""
    from rich.table import Table

    from ..tasks.segment import Segmentation, iter_segment

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


@with_inference_options
def detect(
    paths: list[str] = typer.Argument(..., help=INPUTS_HELP),
    model: str = typer.Option("ssdlite320_mobilenet_v3_large", "--model", "-m", help="A detector: NAME or NAME.TAG "
                              "(default weights unless a tag is given) or a bundle folder; see `visionzoo models "
                              "--task detection`."),
    weights: WeightsFile = None,
    threshold: float = typer.Option(0.5, "--threshold", "-t", min=0.0, max=1.0, help="The lowest score reported."),
    out_dir: Optional[str] = typer.Option(None, "--out", "-o", help="Also write each image there as a PNG with "
                                          "its boxes, labels and scores drawn, and all boxes as COCO results "
                                          "(coco_results.json)."),
    *,
    options: InferenceOptions,
) -> None:
    """Detect objects: one JSON line per image (boxes in its pixels as [x1, y1, x2, y2], label, score)."""
    import json

    from ..tasks.detect import Detections, iter_detect, write_coco_results
    from .common import out

    failures, found = [], []
    for result in iter_detect(paths, model_arg(model, weights), threshold, draw_dir=out_dir, options=options):
        if isinstance(result, Detections):
            out.print(json.dumps(result.to_dict()), markup=False, highlight=False, soft_wrap=True)
            found.append(result)
        else:
            failures.append(result)
            report_failure(result)
    done = len(found)
    if out_dir is not None and done:
        results = write_coco_results(found, out_dir)
        note(f"drew {done} image{'s' if done != 1 else ''} in {out_dir}; COCO results in {results}")
    exit_for_failures(done, failures, "detected")


def _on_ray(paths: list[str], model, out: str | None, options: InferenceOptions, *, embed: bool, address: str | None,
            restart: bool, progress: bool | None, **outputs) -> None:
    """Run predict or embed on Ray (`tasks/ray_engine.py`) and report as the local commands do."""
    from ..tasks.ray_engine import run_on_ray
    from .common import err

    if out is None:
        raise InputError("--engine ray writes its rows to a folder of Parquet files: give one with --out DIR.parquet")
    result = run_on_ray(paths, model, out=out, embed=embed, address=address, workers=options.num_workers,
                        restart=restart, progress=err.is_terminal if progress is None else progress,
                        options=dataclasses.replace(options, num_workers=None), **outputs)
    failures = result.failures + result.errors
    for failure in failures:
        report_failure(failure)
    resumed = f"; {result.resumed} already had one" if result.resumed else ""
    note(f"wrote {result.added} rows to {result.out} ({result.rows} in all{resumed})")
    exit_for_failures(result.added - len(result.errors), failures, "embedded" if embed else "predicted")


def explain(
    paths: list[str] = typer.Argument(..., help=INPUTS_HELP),
    out_dir: str = typer.Option(..., "--out", "-o", help="Folder for the overlays (<stem>.gradcam.png)."),
    model: ModelArg = DEFAULT_MODEL,
    weights: WeightsFile = None,
    target: Optional[str] = typer.Option(None, "--target", "-t", help="The class to explain: an index or a "
                                         "label (default: each image's most probable class)."),
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line per image on stdout."),
) -> None:
    """Grad-CAM: draw where a classifier looked for a class, as a heat map over each image."""
    import json
    import sys

    from ..tasks.explain import Explanation
    from ..tasks.explain import explain as run

    results = run(paths, model_arg(model, weights), target, out=out_dir, max_pixels=max_pixels or None)
    done = [r for r in results if isinstance(r, Explanation)]
    failures = [r for r in results if not isinstance(r, Explanation)]
    for r in results:
        if isinstance(r, Explanation):
            if as_json:
                sys.stdout.write(json.dumps(r.to_dict()) + "\n")
            else:
                note(f"{r.path}: {r.label} ({r.probability:.3f}), hottest at x={r.peak[0]} y={r.peak[1]} "
                     f"-> {r.written}")
        else:
            report_failure(r)
    exit_for_failures(len(done), failures, "explained")
