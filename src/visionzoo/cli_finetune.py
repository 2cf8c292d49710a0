"""The `finetune` and `evaluate` commands (registered on the app in `cli.py`)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .train.config import FinetuneConfig, Precision, Strategy

out = Console()
err = Console(stderr=True)
_D = FinetuneConfig()


def finetune(
    data: Optional[Path] = typer.Argument(None, help="ImageFolder tree (one sub-folder per class) or path,label CSV."),
    model: str = typer.Option(_D.model, "--model", "-m", help="NAME[.TAG] to start from (or a bundle)."),
    strategy: Strategy = typer.Option(_D.strategy.value, "--strategy", "-s",
                                      help="linear: train the classifier on cached features; partial: also the "
                                           "last --unfreeze stages; full: everything; auto: chosen from the data."),
    out_dir: Path = typer.Option(Path("runs/finetune"), "--out", "-o",
                                 help="Run folder; the bundle goes to OUT/bundle."),
    train: Optional[Path] = typer.Option(None, "--train", help="Training set (instead of DATA)."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation set (default: a split of the training set)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e", min=1, help="Default: 30 linear, 10 otherwise."),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size", "-b", min=1, help="Global batch (all processes)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Head learning rate. Default: 3e-3 linear, 1e-3 otherwise."),
    unfreeze: int = typer.Option(_D.unfreeze, "--unfreeze", min=0, help="partial: how many last stages train."),
    lr_decay: float = typer.Option(_D.lr_decay, "--lr-decay", help="Learning-rate factor per earlier stage."),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs",
                                                  help="Linear LR warm-up (default 1; 0 for linear)."),
    head_epochs: int = typer.Option(_D.head_epochs, "--head-epochs", min=0,
                                    help="partial/full: train the head alone first for this many epochs."),
    weight_decay: float = typer.Option(_D.weight_decay, "--weight-decay"),
    label_smoothing: float = typer.Option(_D.label_smoothing, "--label-smoothing"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Crop size (default: the weights' own)."),
    augment: bool = typer.Option(_D.augment, "--augment/--no-augment", help="Random resized crops in training."),
    crop_scale: tuple[float, float] = typer.Option(_D.crop_scale, "--crop-scale",
                                                   help="Area fraction (low high) of the random crops."),
    hflip: bool = typer.Option(_D.hflip, "--hflip/--no-hflip",
                               help="Random horizontal flips (only if mirrored images keep their class)."),
    aug_passes: int = typer.Option(_D.aug_passes, "--aug-passes", min=0,
                                   help="linear: augmented feature passes on top of the clean one."),
    val_fraction: float = typer.Option(_D.val_fraction, "--val-fraction", help="Held out when there is no --val."),
    seed: int = typer.Option(_D.seed, "--seed"),
    precision: Precision = typer.Option(_D.precision.value, "--precision",
                                        help="auto: bf16 on GPUs that support it and on CPUs with native bf16 "
                                             "(AVX512-BF16/AMX) for crops >= 128 px; else fp32."),
    accumulate: int = typer.Option(_D.accumulate, "--accumulate", min=1, help="Micro-batches per optimizer step."),
    patience: Optional[int] = typer.Option(None, "--patience", min=1, help="Early stopping after this many epochs "
                                           "without a better validation accuracy."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Image decoding processes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-epoch lines."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Fine-tune a pre-trained model on labelled images; writes a bundle (OUT/bundle).

    Runs unchanged under `torchrun --nproc-per-node N` (DistributedDataParallel).
    """
    from .tasks.finetune import finetune as run

    cfg = FinetuneConfig(model=model, strategy=strategy, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, lr_decay=lr_decay, unfreeze=unfreeze, warmup_epochs=warmup_epochs,
                         head_epochs=head_epochs, label_smoothing=label_smoothing, image_size=image_size,
                         augment=augment, crop_scale=crop_scale, hflip=hflip, aug_passes=aug_passes,
                         val_fraction=val_fraction, seed=seed,
                         precision=precision, accumulate=accumulate, patience=patience, num_workers=workers)
    result = run(data, out_dir, train=train, val=val, config=cfg, resume=resume, device=device, progress=not quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    if as_json:
        sys.stdout.write(json.dumps({
            "bundle": str(result.bundle), "strategy": result.strategy.value, "reason": result.reason,
            "metrics": result.metrics, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early, "classes": list(result.classes)}, indent=2) + "\n")
        return
    m = result.metrics
    line = f"{result.bundle}  strategy {result.strategy.value}, best epoch {result.best_epoch}"
    if "val_acc" in m:
        line += f", val acc {m['val_acc']:.2%}, top-5 {m['val_top5']:.2%}"
    out.print(line, highlight=False, soft_wrap=True)


def evaluate(
    model: str = typer.Argument(..., help="Bundle folder (or finetune run folder)."),
    data: Path = typer.Argument(..., help="ImageFolder tree or path,label CSV with the model's class names."),
    report: Optional[Path] = typer.Option(None, "--out", "-o", help="Write metrics.json and PNG plots here."),
    fmt: str = typer.Option("table", "--format", "-f", help="table or json."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1),
    workers: Optional[int] = typer.Option(None, "--workers", min=0),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Accuracy, top-5, per-class precision/recall/F1 and the confusion matrix of a model on labelled images."""
    from .cli import EXIT_PARTIAL
    from .errors import InputError
    from .tasks.evaluate import evaluate as run

    if fmt not in ("table", "json"):
        raise InputError(f"--format must be table or json, got {fmt!r}")
    ev = run(model, data, out=report, batch_size=batch_size, num_workers=workers, device=device)
    for f in ev.failures:
        err.print(f"[red]skipped[/red] {f.path}: {f.reason}", highlight=False, soft_wrap=True)
    for note in ev.notes:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    if fmt == "json":
        sys.stdout.write(json.dumps(ev.to_dict(), indent=2) + "\n")
    else:
        out.print(f"{ev.model} on {ev.data}: {ev.num_images} images, accuracy {ev.accuracy:.2%}, "
                  f"top-5 {ev.top5:.2%}, macro F1 {ev.macro_f1:.4f}", highlight=False, soft_wrap=True)
        table = Table("class", "precision", "recall", "F1", "images")
        for c in ev.per_class:
            table.add_row(c.name, f"{c.precision:.4f}", f"{c.recall:.4f}", f"{c.f1:.4f}", str(c.support))
        out.print(table)
        for name, path in ev.files.items():
            out.print(f"{name}: {path}", highlight=False, soft_wrap=True)
    if ev.failures:
        raise typer.Exit(EXIT_PARTIAL)
