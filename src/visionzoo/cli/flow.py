"""`flow`: the motion between two frames, or between consecutive frames of a video."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import InputError
from .common import Device, Threads, WeightsFile, note, set_torch_threads

FLOW_INPUTS_HELP = "Two frames (image files), or one video file."
FLOW_OUT_HELP = ("Two frames: an image (.png, .jpg: the colour-wheel flow with a legend) or a flow file (.npy, "
                 ".flo); repeat --out for several. A video: a folder, written with NNNNNN.png (and --raw) per pair.")
MAX_PIXELS_HELP = ("Frames with more pixels are resized down to this many for the flow, then the flow is brought "
                   "back to their size (RAFT's memory grows with the square of the pixels: about 1 GiB at "
                   "1280x720); 0 computes at full size.")


def flow(
    inputs: list[str] = typer.Argument(..., help=FLOW_INPUTS_HELP),
    out: list[str] = typer.Option(..., "--out", "-o", help=FLOW_OUT_HELP),
    model: str = typer.Option("raft_large", "--model", "-m", help="raft_large or raft_small, NAME.TAG for other "
                              "weights (default: C_T_SKHT_V2 / C_T_V2)."),
    weights: WeightsFile = None,
    updates: int = typer.Option(12, "--updates", min=1, help="RAFT's refinement iterations (more: slower, finer)."),
    every: int = typer.Option(1, "--every", min=1, help="A video: the flow of every N-th frame to the next one."),
    raw: Optional[str] = typer.Option(".npy", "--raw", help="A video: the raw flow file written beside each image "
                                      "(.npy or .flo; 'none' for images only)."),
    max_pixels: int = typer.Option(1280 * 720, "--max-pixels", min=0, help=MAX_PIXELS_HELP),
    max_magnitude: Optional[float] = typer.Option(None, "--max-magnitude", min=0.0, help="Colour scale in pixels "
                                                  "(full saturation); default: each image's largest motion."),
    legend: bool = typer.Option(True, "--legend/--no-legend", help="Draw the colour wheel beside the flow."),
    device: Device = "cpu",
    threads: Threads = None,
) -> None:
    """Estimate optical flow with RAFT and write it as a colour-wheel image and/or a raw .npy / .flo file."""
    from ..data.video import is_video_file
    from ..tasks.flow import estimate_flow, frames_of, load_flow_model, video_flow, write_flow_outputs

    set_torch_threads(threads)
    net = load_flow_model(model, weights=weights, device=device)
    limit = max_pixels or None
    scale = max_magnitude or None
    if len(inputs) == 1 and is_video_file(inputs[0]):
        if len(out) != 1:
            raise InputError("for a video, give one --out folder")
        pairs = 0
        for result in video_flow(net, inputs[0], out[0], every=every, raw=None if raw in (None, "none") else raw,
                                 updates=updates, max_pixels=limit, max_magnitude=scale, legend=legend,
                                 device=device):
            pairs += 1
            note(f"frame {result.index}: max motion {result.max_magnitude:.1f} px -> "
                 + ", ".join(str(f) for f in result.files))
        if not pairs:
            raise InputError(f"{inputs[0]}: fewer than two frames, no flow to compute")
        note(f"wrote the flow of {pairs} frame pairs to {out[0]}")
        return
    frame1, frame2 = frames_of(inputs)
    field = estimate_flow(net, frame1, frame2, updates=updates, max_pixels=limit, device=device)
    for path in write_flow_outputs(field, out, max_magnitude=scale, legend=legend):
        note(f"wrote {path}")
    magnitude = (field[0] ** 2 + field[1] ** 2) ** 0.5
    note(f"flow {Path(inputs[0]).name} -> {Path(inputs[1]).name}: {field.shape[2]}x{field.shape[1]}, mean motion "
         f"({field[0].mean():.2f}, {field[1].mean():.2f}) px, max {magnitude.max():.2f} px")
