"""Fused (`scaled_dot_product_attention`) vs explicit matmul-softmax attention in ViT-B/16.

Float32 CPU inference on one batch (default 8 x 3 x 224 x 224), the same model and weights
for both paths (switched with `visionzoo.models.layers.set_fused_attention`). The two paths
are timed in alternating order, after warm-up, and the median of the repeats is reported.

    python benchmarks/vit_attention.py [--batch 8] [--repeats 7] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import visionzoo
from visionzoo.models.layers import set_fused_attention


def _time_once(model: torch.nn.Module, x: torch.Tensor, fused: bool) -> float:
    set_fused_attention(model, fused)
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_b_16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: the CPUs this process may use)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = visionzoo.create_model(args.arch).eval()
    size = model.image_size or 224
    x = torch.randn(args.batch, 3, size, size)
    times: dict[bool, list[float]] = {True: [], False: []}
    with torch.inference_mode():
        outputs = {}
        for fused in (True, False):
            set_fused_attention(model, fused)
            outputs[fused] = model.forward_features(x)  # the logits of a fresh ViT are 0 (zero head)
        for _ in range(args.warmup):
            for fused in (True, False):
                _time_once(model, x, fused)
        for i in range(args.repeats):
            order = (True, False) if i % 2 == 0 else (False, True)  # no path always runs first
            for fused in order:
                times[fused].append(_time_once(model, x, fused))

    fused_s, explicit_s = statistics.median(times[True]), statistics.median(times[False])
    diff = (outputs[True] - outputs[False]).abs().max().item()
    print(f"{args.arch}, float32, batch {args.batch} x 3 x {size} x {size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} (after {args.warmup} warm-up)")
    print(f"fused    (scaled_dot_product_attention): {fused_s * 1000:9.1f} ms  "
          f"(min {min(times[True]) * 1000:.1f}, max {max(times[True]) * 1000:.1f})")
    print(f"explicit (matmul-softmax-matmul):        {explicit_s * 1000:9.1f} ms  "
          f"(min {min(times[False]) * 1000:.1f}, max {max(times[False]) * 1000:.1f})")
    print(f"ratio explicit / fused: {explicit_s / fused_s:.3f}  (> 1: fused is faster)")
    print(f"max |features fused - explicit|: {diff:.2e}")


if __name__ == "__main__":
    main()
