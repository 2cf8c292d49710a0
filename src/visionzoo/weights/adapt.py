"""Fitting a checkpoint to a model, and saying what was done.

The steps, in order, each recorded in a `LoadReport` (`model.load_report` after
`create_model`, logged at INFO; what was not loaded at WARNING):

1. **rename**: unwrap (`{"state_dict": ...}`, done when reading the file), strip wrapper
   prefixes (`module.`, `model.`, `_orig_mod.`), convert a foreign layout (detected or
   named by the weights record: efficientnet_pytorch, timm, legacy names; `remap.py`).
2. **adapt**: the family's `adapt_state_dict` (e.g. ViT position embeddings for another
   image size; any key whose shape it changes is reported), then the first convolution
   for another number of input channels (`adapt_input_channels`).
3. **compare** with the model: missing, unexpected and shape-mismatched keys.
   BatchNorm's `num_batches_tracked` counters are not required (old checkpoints lack
   them; they do not affect inference).
4. **load**: strict by default (anything that does not fit raises `CheckpointError`);
   `strict=False` loads what fits and lists the rest. A new classifier for another
   `num_classes` is reported as such (`new`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError
from .lean import LeftOnMeta, build_lean, load_assign
from .remap import LAYOUTS, detect_layout, strip_prefixes

if TYPE_CHECKING:
    from ..models.base import VisionModel

log = logging.getLogger("visionzoo")
StateDict = dict[str, torch.Tensor]
BATCH_COUNTER = "num_batches_tracked"


@dataclass
class LoadReport:
    """What loading a checkpoint into a model did. Lists hold state-dict keys unless noted."""

    source: str | None = None  # the file (or "<state dict>")
    format: str | None = None  # "safetensors", "torch zip", "torch legacy pickle"
    remapped: list[str] = field(default_factory=list)  # renaming steps applied, in order (sentences)
    adapted: list[str] = field(default_factory=list)  # tensors changed to fit the model (sentences)
    new: list[str] = field(default_factory=list)  # freshly initialised on purpose (a new classifier)
    missing: list[str] = field(default_factory=list)  # the model's, absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # the checkpoint's, unknown to the model
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint (a, b) vs model (c, d)"
    notes: list[str] = field(default_factory=list)  # harmless differences (sentences)
    lean: bool = False  # built without random init, parameters memory-mapped from the file
    loaded: int = 0  # number of checkpoint tensors loaded into the model

    @property
    def fits(self) -> bool:
        """True when every key of the model and of the checkpoint matched."""
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def not_loaded(self) -> list[str]:
        """Model keys that did not get checkpoint values (missing, mismatched, new)."""
        return self.missing + [m.split(":", 1)[0] for m in self.mismatched] + self.new

    def problems(self, limit: int = 3) -> str:
        """One line: "2 missing (a, b); 1 unexpected (c)"."""
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape mismatches", self.mismatched)):
            if items:
                more = ", ..." if len(items) > limit else ""
                parts.append(f"{len(items)} {label} ({', '.join(items[:limit])}{more})")
        return "; ".join(parts)

    def lines(self, limit: int | None = None) -> list[str]:
        """Human-readable lines; `limit` caps the keys listed per kind."""
        out = [f"weights from {self.source or '<state dict>'}" + (f" ({self.format})" if self.format else "")]
        out += [f"remapped: {s}" for s in self.remapped]
        out += [f"adapted: {s}" for s in self.adapted]
        out += [f"note: {s}" for s in self.notes]
        for label, items in (("missing (left as initialised)", self.missing), ("unexpected (ignored)",
                             self.unexpected), ("shape mismatch (not loaded)", self.mismatched)):
            shown = items if limit is None else items[:limit]
            out += [f"{label}: {k}" for k in shown]
            if len(shown) < len(items):
                out.append(f"{label}: ... and {len(items) - len(shown)} more")
        if self.new:
            out.append(f"new (freshly initialised): {', '.join(self.new)}")
        out.append(f"loaded {self.loaded} tensors" + (" memory-mapped, without random init" if self.lean else ""))
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits}

    def log(self) -> None:
        for line in self.remapped + self.adapted:
            log.info("%s: %s", self.source or "weights", line)
        if self.missing or self.unexpected or self.mismatched:
            log.warning("%s: not all of it loaded: %s", self.source or "weights", self.problems(limit=10))


# -- steps ------------------------------------------------------------------------------------------
def rename(sd: Mapping[str, torch.Tensor], target_keys: list[str], layout: str | None,
           report: LoadReport) -> StateDict:
    """Strip wrapper prefixes and convert a foreign layout (detected when `layout` is None)."""
    sd, prefixes = strip_prefixes(sd, target_keys)
    report.remapped += [f"stripped the '{p}' prefix from every key" for p in prefixes]
    name = detect_layout(sd) if layout is None else layout
    if name != "native":
        if name not in LAYOUTS:
            raise CheckpointError(f"unknown state-dict layout {name!r}; known: {', '.join(LAYOUTS)}")
        sd = LAYOUTS[name].convert(sd, target_keys)
        report.remapped.append(f"converted the {name} layout to torchvision names ({LAYOUTS[name].description})")
    return dict(sd)


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """First-convolution filters for `in_chans` input channels from filters trained on
    `weight.shape[1]` (RGB: 3). One channel: the sum of the filters, so a grey image gives
    the activations its RGB copy gave. More (or other) channels: the filters repeated
    cyclically and scaled by `weight.shape[1] / in_chans`, keeping the activations' scale."""
    src = weight.shape[1]
    w = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        out = w.repeat(1, math.ceil(in_chans / src), 1, 1)[:, :in_chans] * (src / in_chans)
    return out.to(weight.dtype)


def adapt(sd: StateDict, model: VisionModel, report: LoadReport) -> StateDict:
    """The family's `adapt_state_dict`, then the first convolution; then compare with the model."""
    before = {k: tuple(v.shape) for k, v in sd.items()}
    hook = getattr(model, "adapt_state_dict", None)  # any nn.Module may be given to load_weights
    sd = dict(hook(sd)) if hook is not None else sd
    family = type(model).__name__
    for key in sorted(set(before) | set(sd)):
        after = tuple(sd[key].shape) if key in sd else None
        if key not in before:
            report.adapted.append(f"{key}: added by {family}.adapt_state_dict {after}")
        elif after is None:
            report.adapted.append(f"{key}: dropped by {family}.adapt_state_dict")
        elif after != before[key]:
            report.adapted.append(f"{key}: {before[key]} -> {after} by {family}.adapt_state_dict")

    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    first = f"{getattr(model, 'first_conv', '')}.weight"
    w, target = sd.get(first), own.get(first)
    if w is not None and target is not None and w.ndim == len(target) == 4 and w.shape[1] != target[1] \
            and (w.shape[0], *w.shape[2:]) == (target[0], *target[2:]):  # only the input channels differ
        sd[first] = adapt_input_channels(w, target[1])
        how = "sum of the filters" if target[1] == 1 else f"filters repeated, scaled by {w.shape[1]}/{target[1]}"
        report.adapted.append(f"{first}: {w.shape[1]} -> {target[1]} input channels ({how})")

    report.missing = [k for k in own if k not in sd and not k.endswith(BATCH_COUNTER)]
    report.unexpected = [k for k in sd if k not in own]
    report.mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {own[k]}"
                         for k in own if k in sd and tuple(sd[k].shape) != own[k]]
    # counters of layers whose statistics are loaded (those of missing layers are part of them)
    counters = [k for k in own if k.endswith(BATCH_COUNTER) and k not in sd
                and k[: -len(BATCH_COUNTER)] + "running_mean" in sd]
    if counters:
        report.notes.append(f"{len(counters)} BatchNorm {BATCH_COUNTER} counters absent: set to 0 "
                            f"(they do not affect inference)")
    return sd


# -- planning and loading --------------------------------------------------------------------------
@dataclass
class LoadPlan:
    """A model built for a checkpoint (parameters on the meta device when `lean`), the
    checkpoint fitted to it, and the report so far. `realize` loads it."""

    model: VisionModel
    lean: bool
    state_dict: StateDict
    report: LoadReport
    build: Callable[[], VisionModel]  # builds the same model normally (random init)


def plan_load(build: Callable[..., VisionModel], sd: Mapping[str, torch.Tensor], *, kwargs: Mapping[str, Any],
              layout: str | None = None, size_from_checkpoint: bool = False,
              report: LoadReport | None = None) -> LoadPlan:
    """Build the model for `sd` without random init and fit `sd` to it.

    `build(**kwargs)` builds the model (kwargs include `num_classes`). With
    `size_from_checkpoint` (a local file: its own head and input channels are the truth),
    `num_classes` is taken from the checkpoint's classifier and `in_chans`, unless given in
    kwargs, from its first convolution.
    """
    report = report or LoadReport()
    kwargs = dict(kwargs)
    model, lean = build_lean(lambda: build(**kwargs))
    sd = rename(sd, list(model.state_dict()), layout, report)
    if size_from_checkpoint:
        changes = _sizes_from_checkpoint(sd, model, explicit=kwargs)
        if changes:
            kwargs.update(changes)
            report.adapted += [f"{k}={v} taken from the checkpoint" for k, v in changes.items()]
            model, lean = build_lean(lambda: build(**kwargs))
    sd = adapt(sd, model, report)
    return LoadPlan(model, lean, sd, report, lambda: build(**kwargs))


def _sizes_from_checkpoint(sd: StateDict, model: VisionModel, explicit: Mapping[str, Any]) -> dict[str, int]:
    changes: dict[str, int] = {}
    head = sd.get(f"{model.class_layers[0]}.weight") if model.class_layers else None
    if head is not None and head.ndim >= 2 and head.shape[0] != model.num_classes:
        changes["num_classes"] = int(head.shape[0])
    first = sd.get(f"{getattr(model, 'first_conv', '')}.weight")
    own = model.state_dict().get(f"{getattr(model, 'first_conv', '')}.weight")
    if "in_chans" not in explicit and first is not None and own is not None and first.ndim == 4 \
            and first.shape[1] != own.shape[1]:
        changes["in_chans"] = int(first.shape[1])
    return changes


def realize(plan: LoadPlan, strict: bool = True, what: str | None = None) -> VisionModel:
    """Load the planned checkpoint: assigned into the meta-built model when it covers every
    parameter, else copied into a normally built one (`strict=False` partial loads)."""
    report = plan.report
    if strict and not report.fits:
        raise CheckpointError(
            f"checkpoint {report.source or '<state dict>'} does not fit {what or type(plan.model).__name__}: "
            f"{report.problems()}. Check the model name (`visionzoo inspect` tells which architecture a "
            f"file is for), pass num_classes for a different head, or strict=False to load what fits")
    fitting = _fitting(plan.state_dict, report)
    model = plan.model
    if plan.lean:
        try:
            load_assign(model, fitting)
            report.lean, report.loaded = True, len(fitting)
            return model
        except LeftOnMeta as e:
            if strict:  # every key matched, yet something is left: the family needs a look
                log.warning("%s: %s after a lean load; building it the normal way", what or "model", e)
        model = plan.build()
    model.load_state_dict(fitting, strict=False)
    report.lean, report.loaded = False, len(fitting)
    return model


def load_weights(model: VisionModel, weights: str | Any | Mapping[str, torch.Tensor], *, strict: bool = True,
                 layout: str | None = None) -> LoadReport:
    """Load a checkpoint (a path or a state dict) into an existing model, renaming and
    adapting as `create_model` does; returns the report (also set as `model.load_report`).

    With `strict=False`, loads what fits and returns (and logs) the list of what was not
    loaded instead of raising.
    """
    from .io import read_checkpoint

    report = LoadReport()
    if isinstance(weights, Mapping):
        sd, report.source = dict(weights), "<state dict>"
    else:
        ckpt = read_checkpoint(weights)
        sd, report.source, report.format = ckpt.state_dict, str(ckpt.path), ckpt.format
        report.remapped += [f"unwrapped the '{k}' entry" for k in ckpt.wrapper]
    sd = rename(sd, list(model.state_dict()), layout, report)
    sd = adapt(sd, model, report)
    if strict and not report.fits:
        raise CheckpointError(f"checkpoint {report.source} does not fit {type(model).__name__}: "
                              f"{report.problems()}; pass strict=False to load what fits")
    fitting = _fitting(sd, report)
    model.load_state_dict(fitting, strict=False)
    report.loaded = len(fitting)
    model.load_report = report
    report.log()
    return report


def _fitting(sd: StateDict, report: LoadReport) -> StateDict:
    """The entries of `sd` that the model has, with the model's shapes."""
    skip = set(report.unexpected) | {m.split(":", 1)[0] for m in report.mismatched}
    return {k: v for k, v in sd.items() if k not in skip}
