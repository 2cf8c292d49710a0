"""Classify videos: evenly spaced clips of each video, top-k per clip and averaged over the clips.

`predict` and `embed` hand video models here (`iter_predict` / `embed` see the runner's task).
Each video is cut into `clips` evenly spaced clips sampled as the model's weights were evaluated
(`data/video.py`: frames per clip, frame rate, resize, crop, mean and std of the recipe); the
clips run through the model in batches of at most `batch_size` and the video's scores are the
mean of its clips' probabilities, as torchvision's video reference averages them. Videos are
decoded in worker processes, one whole video per item, so memory holds the clips in flight and
never a whole video. Bad files (not a video, corrupt, truncated, no frames, audio only) become
`Failure`s and the run goes on.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.inputs import Failure
from ..data.video import video_batches
from ..errors import InputError, check_at_least
from ..runtime.backends import Runner, TorchRunner
from ..runtime.options import InferenceOptions
from .labels import Label, top_labels

VIDEO_KINDS = ("video",)  # the media files a video model takes (`expand_inputs(kinds=...)`)


@dataclass(frozen=True)
class ClipPrediction:
    index: int  # 0-based position of the clip in the video
    start: float  # seconds
    end: float
    top: tuple[Label, ...]

    def to_dict(self) -> dict:
        return {"clip": self.index + 1, "start": round(self.start, 3), "end": round(self.end, 3),
                "predictions": _labels(self.top)}


@dataclass(frozen=True)
class VideoPrediction:
    """A video's classes averaged over its clips (`top`), and each clip's (`clips`)."""

    path: str
    top: tuple[Label, ...]  # most probable first, from the mean of the clips' probabilities
    clips: tuple[ClipPrediction, ...]

    @property
    def label(self) -> str:
        return self.top[0].label

    def to_dict(self) -> dict:
        return {"path": self.path, "predictions": _labels(self.top), "clips": [c.to_dict() for c in self.clips]}


def _labels(top: Sequence[Label]) -> list[dict]:
    return [{"rank": r + 1, "index": t.index, "label": t.label, "probability": t.probability}
            for r, t in enumerate(top)]


def check_video_runner(runner: Runner) -> TorchRunner:
    """Video models run on the torch backend (exported clip graphs are for deployment, `export`)."""
    if not isinstance(runner, TorchRunner):
        raise InputError(f"{runner.arch} is a video model: predict and embed run it on the torch backend (use "
                         f"--backend torch); `visionzoo export` writes its ONNX graph for other runtimes")
    return runner


def iter_predict_videos(files: Sequence[Path], runner: Runner, topk: int, *, clips: int | None,
                        options: InferenceOptions) -> Iterator[VideoPrediction | Failure]:
    """One `VideoPrediction` or `Failure` per file, in order (see the module docstring)."""
    check_video_runner(runner)
    check_at_least("clips", clips, 1, optional=True)
    categories = runner.categories
    for batch in video_batches(files, runner.preprocess, clips=clips, batch_size=1, num_workers=options.num_workers,
                               limits=options.limits):
        for i, reason in batch.failures:
            yield Failure(str(files[i]), reason)
        if batch.images is None:
            continue
        for i, clip_tensor, spans in zip(batch.indices, batch.images, batch.spans, strict=True):
            probs = clip_probabilities(runner, clip_tensor, options.batch_size)
            yield VideoPrediction(str(files[i]), top_labels(probs.mean(dim=0), topk, categories),
                                  tuple(ClipPrediction(k, start, end, top_labels(p, topk, categories))
                                        for k, (p, (start, end)) in enumerate(zip(probs, spans, strict=True))))


def clip_probabilities(runner: Runner, clips: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(clips, C, T, H, W) -> (clips, classes) softmax probabilities, `batch_size` clips at a time."""
    with torch.inference_mode():
        return torch.cat([torch.softmax(runner.logits(clips[s:s + batch_size]), dim=1)
                          for s in range(0, len(clips), batch_size)])


def clip_embeddings(runner: Runner, videos: torch.Tensor) -> torch.Tensor:
    """(videos, clips, C, T, H, W) -> (videos, D): the mean of each video's pooled clip embeddings."""
    n, k = videos.shape[:2]
    with torch.inference_mode():
        return runner.embeddings(videos.flatten(0, 1)).view(n, k, -1).mean(dim=1)


def videos_per_batch(batch_size: int, clips: int) -> int:
    """How many whole videos a batch of (at most, but at least one video) `batch_size` clips holds."""
    return max(1, batch_size // clips)
