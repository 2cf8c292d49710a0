"""`finetune` and `evaluate`. The fine-tuning options are generated from `FinetuneConfig`'s fields (their
help text and flags live there), so the configuration and the command cannot drift apart."""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..train.config import FinetuneConfig
from .common import (
    DECODE_LIMITS_HELP,
    EXIT_PARTIAL,
    MAX_PIXELS_HELP,
    WAIT_HELP,
    DecodeLimitsText,
    MaxPixels,
    OutputFormat,
    decode_limits,
    note,
    out,
    report_failure,
    say,
)


def _config_parameters() -> list[inspect.Parameter]:
    """One keyword-only typer option per `FinetuneConfig` field."""
    hints = typing.get_type_hints(FinetuneConfig)
    params = []
    for f in dataclasses.fields(FinetuneConfig):
        flags = f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",)
        default = f.default.value if isinstance(f.default, Enum) else f.default
        option = typer.Option(default, *flags, help=f.metadata.get("help"))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=_cli_type(hints[f.name])))
    return params


def _cli_type(hint: Any) -> Any:
    """`X | None` as typer reads it (`Optional[X]`)."""
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        return Optional[next(a for a in args if a is not type(None))]  # noqa: UP045 (typer's spelling)
    return hint


def _finetune(data: Optional[Path] = typer.Argument(None, help="ImageFolder tree (one sub-folder per class), "
                                                    "path,label CSV, a segmentation folder (images/ and masks/ of "
                                                    "class-index PNGs, classes.txt), or boxes: a COCO instances JSON "
                                                    "(or a folder holding instances.json) or a path,x1,y1,x2,y2,label "
                                                    "CSV."),
              *,
              out_dir: Path = typer.Option(Path("runs/finetune"), "--out", "-o",
                                           help="Run folder; the bundle goes to OUT/bundle."),
              train: Optional[Path] = typer.Option(None, "--train", help="Training set (instead of DATA)."),
              val: Optional[Path] = typer.Option(None, "--val", help="Validation set (default: a split of the "
                                                 "training set)."),
              classes: Optional[str] = typer.Option(None, "--classes", help="Segmentation: the class names in index "
                                                    "order, comma-separated (instead of DATA/classes.txt)."),
              device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
              resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last "
                                          "checkpoint."),
              quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-epoch lines."),
              as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
              # plain defaults, not Annotated: `_with_config_options` rebuilds the annotations
              limits: Optional[str] = typer.Option(None, "--decode-limits", metavar="KEY=VALUE,...",
                                                   help=DECODE_LIMITS_HELP),
              max_pixels: Optional[int] = typer.Option(None, "--max-pixels", min=0, help=MAX_PIXELS_HELP),
              wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
              **config: Any) -> None:
    """Fine-tune a pre-trained model on labelled images (or images and masks); writes a bundle (OUT/bundle).

    Runs unchanged under `torchrun --nproc-per-node N` (DistributedDataParallel).
    """
    from ..tasks.finetune import finetune as run

    result = run(data, out_dir, train=train, val=val, classes=classes, config=FinetuneConfig(**config),
                 resume=resume, device=device, progress=not quiet, limits=decode_limits(limits, max_pixels), wait=wait)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    for failure in result.failures:
        report_failure(failure)
    if as_json:
        sys.stdout.write(json.dumps({
            "bundle": str(result.bundle), "strategy": result.strategy.value, "reason": result.reason,
            "metrics": result.metrics, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early, "classes": list(result.classes), "task": result.task.value,
            "failures": [{"path": f.path, "reason": f.reason} for f in result.failures]}, indent=2) + "\n")
    else:
        m = result.metrics
        line = f"{result.bundle}  strategy {result.strategy.value}, best epoch {result.best_epoch}"
        if "val_acc" in m:
            line += f", val acc {m['val_acc']:.2%}, top-5 {m['val_top5']:.2%}"
        elif "val_miou" in m:
            line += f", val mIoU {m['val_miou']:.2%}, pixel acc {m['val_pixel_acc']:.2%}"
        elif "val_ap50" in m:
            line += f", val AP {m['val_ap']:.4f}, AP50 {m['val_ap50']:.4f}"
            if "val_mask_ap50" in m:
                line += f", mask AP {m['val_mask_ap']:.4f}, mask AP50 {m['val_mask_ap50']:.4f}"
            if "val_keypoint_ap50" in m:
                line += f", keypoint AP {m['val_keypoint_ap']:.4f}, keypoint AP50 {m['val_keypoint_ap50']:.4f}"
        say(line)
    if result.failures:
        raise typer.Exit(EXIT_PARTIAL)


def _with_config_options(func):
    """`func` with its `**config` replaced by the generated options (typer reads the signature)."""
    signature = inspect.signature(func)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    generated = _config_parameters()
    # the run's options first, then the configuration's, as `--help` lists them
    func.__signature__ = signature.replace(parameters=[*own[:1], *generated, *own[1:]])
    func.__annotations__ = {**typing.get_type_hints(func), **{p.name: p.annotation for p in generated}}
    func.__annotations__.pop("config", None)
    return func


finetune = _with_config_options(_finetune)
finetune.__name__ = "finetune"


def evaluate(
    model: str = typer.Argument(..., help="Bundle folder (or finetune run folder)."),
    data: Path = typer.Argument(..., help="ImageFolder tree or path,label CSV with the model's class names; for a "
                                "segmentation model, a folder of images/ and masks/; for a detector, a COCO "
                                "instances JSON or a path,x1,y1,x2,y2,label CSV; for a video model, class "
                                "sub-folders of videos."),
    report: Optional[Path] = typer.Option(None, "--out", "-o", help="Write metrics.json and PNG plots here."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table or json."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1),
    workers: Optional[int] = typer.Option(None, "--workers", min=0),
    device: str = typer.Option("cpu", "--device"),
    limits: DecodeLimitsText = None,
    max_pixels: MaxPixels = None,
    clips: Optional[int] = typer.Option(None, "--clips", min=1, help="Video models: clips per video (default: the "
                                        "recipe's); the mean of their probabilities scores the video."),
) -> None:
    """Accuracy, top-5, per-class precision/recall/F1 and the confusion matrix of a model on labelled images
    (or videos); for a segmentation model, mIoU, pixel accuracy, per-class IoU and the pixel confusion matrix;
    for a detector, COCO mAP (AP, AP50, AP75, per size and per class; pycocotools) and a precision-recall plot."""
    from ..errors import InputError
    from ..tasks.evaluate import SegmentationEvaluation
    from ..tasks.evaluate import evaluate as run
    from ..tasks.evaluate_detection import DetectionEvaluation

    if fmt not in (OutputFormat.table, OutputFormat.json):
        raise InputError(f"--format must be table or json, got {fmt.value!r}")
    ev = run(model, data, out=report, batch_size=batch_size, num_workers=workers, device=device,
             limits=decode_limits(limits, max_pixels), clips=clips)
    for f in ev.failures:
        report_failure(f)
    for text in ev.notes:
        note(f"note: {text}")
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(ev.to_dict(), indent=2) + "\n")
    elif isinstance(ev, DetectionEvaluation):
        say(f"{ev.model} on {ev.data}: {ev.num_images} images, {ev.num_boxes} boxes, AP {ev.ap:.4f}, AP50 "
            f"{ev.ap50:.4f}, AP75 {ev.ap75:.4f}, AP small/medium/large "
            + "/".join("-" if v is None else f"{v:.4f}" for v in (ev.ap_small, ev.ap_medium, ev.ap_large))
            + ("" if ev.mask_ap is None else f"; mask AP {ev.mask_ap:.4f}, mask AP50 {ev.mask_ap50:.4f}, mask AP75 "
                                             f"{ev.mask_ap75:.4f}")
            + ("" if ev.keypoint_ap is None else f"; keypoint AP {ev.keypoint_ap:.4f}, keypoint AP50 "
                                                 f"{ev.keypoint_ap50:.4f}, keypoint AP75 {ev.keypoint_ap75:.4f}"))
        table = Table("class", "AP", "AP50")
        for name, ap, ap50 in zip(ev.classes, ev.class_ap, ev.class_ap50, strict=True):
            table.add_row(name, "-" if ap is None else f"{ap:.4f}", "-" if ap50 is None else f"{ap50:.4f}")
        out.print(table)
        for name, path in ev.files.items():
            say(f"{name}: {path}")
    elif isinstance(ev, SegmentationEvaluation):
        say(f"{ev.model} on {ev.data}: {ev.num_images} images, mIoU {ev.miou:.2%}, pixel accuracy "
            f"{ev.pixel_accuracy:.2%}")
        table = Table("class", "IoU", "accuracy", "pixels")
        for name, iou, acc, row in zip(ev.classes, ev.iou, ev.class_accuracy, ev.confusion, strict=True):
            table.add_row(name, "-" if iou is None else f"{iou:.4f}", "-" if acc is None else f"{acc:.4f}",
                          f"{sum(row):,}")
        out.print(table)
        for name, path in ev.files.items():
            say(f"{name}: {path}")
    else:
        say(f"{ev.model} on {ev.data}: {ev.num_images} images, accuracy {ev.accuracy:.2%}, "
            f"top-5 {ev.top5:.2%}, macro F1 {ev.macro_f1:.4f}")
        table = Table("class", "precision", "recall", "F1", "images")
        for c in ev.per_class:
            table.add_row(c.name, f"{c.precision:.4f}", f"{c.recall:.4f}", f"{c.f1:.4f}", str(c.support))
        out.print(table)
        for name, path in ev.files.items():
            say(f"{name}: {path}")
    if ev.failures:
        raise typer.Exit(EXIT_PARTIAL)
