"""How to run inference: one typed record that predict, embed, serve and the other tasks share.

    options = InferenceOptions(backend="openvino", threads=2, batch_size=64)
    visionzoo.predict("photos/", options=options)          # or the same fields as keywords
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..data.images import DEFAULT_LIMITS, DecodeLimits
from ..enums import Precision, parse_enum
from ..errors import InputError, check_at_least
from .backends import Backend, Runner, open_runner


@dataclass(frozen=True)
class InferenceOptions:
    """Decoding, batching and the runtime a workflow runs a model with."""

    batch_size: int = 32
    num_workers: int | None = None  # decoding processes; None: one per spare core; 0: in the main process
    fast: bool = True  # decode large JPEGs at a reduced scale (False: torchvision's preprocessing exactly)
    limits: DecodeLimits = DEFAULT_LIMITS  # the budget of each image decode (`max_pixels=` sets its pixel limit)
    device: str = "cpu"  # torch device of the torch backend
    backend: Backend = Backend.AUTO  # torch, onnxruntime, openvino, or auto (measured: runtime/autotune.py)
    threads: int | None = None  # compute threads of the model (None: the cores decoding leaves, see split_cores)
    precision: Precision = Precision.AUTO  # fp32, bf16, or auto (bf16 where the hardware runs it natively)

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", parse_enum(Backend, self.backend, "backend"))
        object.__setattr__(self, "precision", parse_enum(Precision, self.precision, "precision"))
        object.__setattr__(self, "device", str(torch.device(self.device)))
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("num_workers", self.num_workers, 0, optional=True, note=" (0 decodes in the main process)")
        check_at_least("threads", self.threads, 1, optional=True)
        if isinstance(self.limits, str):
            object.__setattr__(self, "limits", DecodeLimits.parse(self.limits))
        if not isinstance(self.limits, DecodeLimits):
            raise InputError(f"limits must be a DecodeLimits (or text such as 'pixels=200M,bytes=1G'), "
                             f"got {type(self.limits).__name__}")

    @property
    def max_pixels(self) -> int | None:
        """The pixel limit of the decode budget (refuse larger images; None: no limit)."""
        return self.limits.max_pixels

    @classmethod
    def of(cls, options: InferenceOptions | None = None, **settings: Any) -> InferenceOptions:
        """`options` (or the defaults) with the keyword `settings` applied; unknown names are refused.
        `max_pixels=N` sets the pixel limit of `limits`."""
        known = {f.name for f in fields(cls)} | {"max_pixels"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise InputError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                             f"the inference options are {', '.join(sorted(known))}")
        base = options or cls()
        if "max_pixels" in settings:
            max_pixels = settings.pop("max_pixels")
            if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                           or max_pixels < 1):
                raise InputError(f"max_pixels must be an integer >= 1 (None: no limit), got {max_pixels!r}")
            limits = settings.get("limits", base.limits)
            limits = DecodeLimits.parse(limits) if isinstance(limits, str) else limits
            settings["limits"] = dataclasses.replace(limits, max_pixels=max_pixels)
        return dataclasses.replace(base, **settings)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def open(self, model: str | os.PathLike | Any) -> Runner:
        """A runner for `model` (a name, bundle, model, exported file or runner) with these settings."""
        return open_runner(model, self.backend, threads=self.threads, device=self.device, precision=self.precision,
                           batch_size=self.batch_size)
