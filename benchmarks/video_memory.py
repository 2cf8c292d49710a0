"""Peak memory of classifying a long video: it must not grow with the video's length.

    python benchmarks/video_memory.py [--minutes 1,10] [--size 1280x720] [--clips 5] [--model r3d_18]
                                      [--workdir DIR] [--json]

Writes one 720p H.264 video per length (once, in `--workdir`), cheaply: two seconds of a square
moving over a real photo are encoded once, with a keyframe every two seconds and no B-frames,
and their packets are muxed again and again with shifted timestamps, so a 10-minute file takes
seconds to write and a few MB. Then, in a fresh Python process per length, classifies the video
with MODEL (randomly initialised: the weights do not change the memory) over `--clips` evenly
spaced clips, as `visionzoo predict VIDEO --clips N` does, and reports the peak resident memory
(max RSS) and the time. The acceptance bound: the longest video's peak within 10% of the
shortest's (exit code 1 otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUND = 0.10
FPS = 30
GOP_SECONDS = 2

_RUN = """
import resource, sys, time
import torch, visionzoo
from visionzoo.tasks.predict import predict
torch.manual_seed(0)
model = visionzoo.create_model(sys.argv[2])
start = time.perf_counter()
(result,) = predict([sys.argv[1]], model, topk=1, clips=int(sys.argv[3]), num_workers=0, batch_size=int(sys.argv[3]))
seconds = time.perf_counter() - start
assert hasattr(result, "clips"), result
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seconds, len(result.clips))
"""


def write_long_video(path: Path, minutes: float, width: int, height: int) -> Path:
    """A `minutes`-long H.264 video: one encoded GOP repeated (see the module docstring)."""
    import av
    import numpy as np
    from PIL import Image

    photo = ROOT / "examples" / "images" / "coffee.png"
    background = np.asarray(Image.open(photo).convert("RGB").resize((width, height)))
    gop = GOP_SECONDS * FPS
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "35",
                          "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0"}
        encoded = []
        for t in range(gop):
            frame = background.copy()
            x = (t * 8) % (width - 64)
            frame[height // 2 - 32:height // 2 + 32, x:x + 64] = (255, 40, 200)
            encoded += list(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        encoded += list(stream.encode())
        # muxing takes a packet's data: keep the bytes and timestamps, make new packets from them
        packets = [(bytes(p), p.pts, p.dts, p.is_keyframe, p.time_base) for p in encoded]
        span = packets[-1][1] + (packets[-1][1] - packets[-2][1])  # the GOP's duration in time-base ticks
        for r in range(max(1, round(minutes * 60 / GOP_SECONDS))):
            for data, pts, dts, key, time_base in packets:
                packet = av.Packet(data)
                packet.stream, packet.time_base = stream, time_base
                packet.pts, packet.dts, packet.is_keyframe = pts + r * span, dts + r * span, key
                container.mux(packet)
    return path


def measure(video: Path, model: str, clips: int) -> tuple[float, float, int]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _RUN, str(video), model, str(clips)], capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "PYTHONPATH": path})
    if proc.returncode:
        raise SystemExit(f"classifying {video} failed:\n{proc.stderr[-2000:]}")
    peak, seconds, n = proc.stdout.split()
    return float(peak), float(seconds), int(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", default="1,10")
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--clips", type=int, default=5)
    parser.add_argument("--model", default="r3d_18")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    workdir = args.workdir or Path(tempfile.gettempdir()) / "visionzoo-video-memory"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for minutes in (float(m) for m in args.minutes.split(",")):
        video = workdir / f"moving-{minutes:g}min-{width}x{height}.mp4"
        if not video.is_file():
            write_long_video(video, minutes, width, height)
        peak, seconds, n = measure(video, args.model, args.clips)
        rows.append({"minutes": minutes, "file_mib": video.stat().st_size / 2**20, "peak_rss_mib": peak,
                     "seconds": seconds, "clips": n})
    growth = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"] - 1
    result = {"model": args.model, "size": [width, height], "clips": args.clips, "runs": rows, "growth": growth,
              "bound": BOUND}
    if args.json:
        print(json.dumps(result))
    else:
        for r in rows:
            print(f"{r['minutes']:g} min ({r['file_mib']:.1f} MiB file): peak RSS {r['peak_rss_mib']:.0f} MiB, "
                  f"{r['seconds']:.1f} s for {r['clips']} clips")
        print(f"peak RSS growth from {rows[0]['minutes']:g} to {rows[-1]['minutes']:g} min: {growth:+.1%} "
              f"(bound {BOUND:.0%})")
    sys.exit(0 if abs(growth) <= BOUND else 1)


if __name__ == "__main__":
    main()
