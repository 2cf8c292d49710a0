"""Render docs/flow.png: two frames and the colour coding of the motion between them.

Usage: python scripts/make_flow_figure.py [OUT]

The second frame is a real photo rotated by 4 degrees about its centre and moved by (3, -2) pixels,
so the flow between the frames is known exactly at every pixel; the figure shows the two frames and
that field in the Middlebury colour coding `visionzoo flow` writes (with its legend). A pre-trained
RAFT's estimate of this pair (`visionzoo flow a.png b.png --out flow.png`) looks the same up to its
error (about a pixel at the edges, less inside).
"""
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from visionzoo.tasks.flow import flow_image  # noqa: E402

ANGLE, SHIFT = math.radians(4), (3.0, -2.0)


def main(out: Path) -> None:
    photo = Image.open(ROOT / "examples" / "images" / "chelsea.png").convert("RGB").resize((320, 224))
    w, h = photo.size
    cx, cy = (w - 1) / 2, (h - 1) / 2
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    # where each pixel of frame 1 goes in frame 2: rotated about the centre, then shifted
    c, s = math.cos(ANGLE), math.sin(ANGLE)
    x2 = cx + c * (xs - cx) - s * (ys - cy) + SHIFT[0]
    y2 = cy + s * (xs - cx) + c * (ys - cy) + SHIFT[1]
    flow = np.stack([x2 - xs, y2 - ys]).astype(np.float32)
    # frame 2 samples frame 1 through the inverse motion
    inverse = (c, s, -(c * (cx + SHIFT[0]) + s * (cy + SHIFT[1])) + cx,
               -s, c, -(-s * (cx + SHIFT[0]) + c * (cy + SHIFT[1])) + cy)
    second = photo.transform(photo.size, Image.Transform.AFFINE, inverse, Image.Resampling.BILINEAR)
    coded = flow_image(flow)
    gap = 8
    canvas = Image.new("RGB", (w * 2 + coded.width + 2 * gap, h + 22), "white")
    for i, (img, title) in enumerate(((photo, "frame 1"), (second, "frame 2: rotated 4 deg, moved (3, -2)"),
                                      (coded, "flow (colour = direction, saturation = speed)"))):
        x = i * (w + gap)
        canvas.paste(img, (x, 22))
        ImageDraw.Draw(canvas).text((x + 2, 4), title, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "flow.png")
