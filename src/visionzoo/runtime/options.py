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

from ..data.images import DEFAULT_MAX_PIXELS
from ..enums import Precision, parse_enum
from ..errors import InputError, check_at_least
from .backends import Backend, Runner, open_runner


@dataclass(frozen=True)
class InferenceOptions:
    """Decoding, batching and the runtime a workflow runs a model with."""

    batch_size: int = 32
    num_workers: int | None = None  # decoding processes; None: one per spare core; 0: in the main process
    fast: bool = True  # decode large JPEGs at a reduced scale (False: torchvision's preprocessing exactly)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # refuse larger images (decompression bombs); None: no limit
    device: str = "cpu"  # torch device of the torch backend
    backend: Backend = Backend.AUTO  # torch, onnxruntime, openvino, or auto
    threads: int | None = None  # compute threads of the runtimes (None: one per core)
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", parse_enum(Backend, self.backend, "backend"))
        object.__setattr__(self, "precision", parse_enum(Precision, self.precision, "precision"))
        object.__setattr__(self, "device", str(torch.device(self.device)))
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("num_workers", self.num_workers, 0, optional=True, note=" (0 decodes in the main process)")
        check_at_least("threads", self.threads, 1, optional=True)
        check_at_least("max_pixels", self.max_pixels, 1, optional=True, note=" (None: no limit)")

    @classmethod
    def of(cls, options: InferenceOptions | None = None, **settings: Any) -> InferenceOptions:
        """`options` (or the defaults) with the keyword `settings` applied; unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise InputError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                             f"the inference options are {', '.join(sorted(known))}")
        return dataclasses.replace(options or cls(), **settings)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def open(self, model: str | os.PathLike | Any) -> Runner:
        """A runner for `model` (a name, bundle, model, exported file or runner) with these settings."""
        return open_runner(model, self.backend, threads=self.threads, device=self.device, precision=self.precision)
