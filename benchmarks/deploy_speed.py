"""CPU inference throughput: visionzoo's default against OpenVINO's defaults, plain ONNX Runtime and PyTorch.

    python benchmarks/deploy_speed.py [--models efficientnet_lite0,...] [--batch 32] [--repeats 5] [--threads N]

For each model, one process measures side by side (rounds interleaved, so that a machine
that speeds up or slows down affects every contestant alike; median of the rounds):
  vz default   what `visionzoo predict` runs with no backend or precision flags: `open_runner(model)`,
               `auto` (the fastest installed backend and precision whose top-1 agrees with float32
               PyTorch, measured once; its choice is printed);
  openvino default  the same exported ONNX file compiled by OpenVINO with its own defaults
               (`core.compile_model(file, "CPU")`: its automatic bfloat16 on CPUs that have it);
  plain ort    the model exported with `torch.onnx.export`, run by an ONNX Runtime session
               with default options and the same thread count;
  eager        the model in PyTorch eager mode, `torch.no_grad()`, NCHW input: what a user writes;
  vz torch / vz onnxruntime / vz openvino   each visionzoo backend forced, in float32;
  vz int8 ort / vz int8 openvino  (models in --int8) the static int8 model from
               `visionzoo.quantize`, calibrated on augmented copies of real photos.
The timed batch is --batch real photos, preprocessed for the model (the packaged photos and
augmented copies drawn with another seed than `auto`'s check set): what a runner does can
depend on the images (`auto` may choose bfloat16 with its near ties run again in float32, and
random pixels are no stand-in: EfficientNet-Lite0 finds no near tie among 32 of them, and 22% of
these photos); the share of the batch run again is printed.
It prints images/second at batch --batch, the top-1 agreement of the default and of
OpenVINO's default with float32 PyTorch on `auto`'s check set (the packaged photos and
augmented copies), and the ratios the project claims: the default against OpenVINO's
default (>= 0.95, agreement >= 99.5%), the fastest float32 backend against plain ONNX
Runtime (>= 1.0) and against eager (>= 1.3), the fastest int8 backend against plain ONNX
Runtime float32 (>= 2.0).

Speed does not depend on the weights' values: models without an offline checkpoint
(everything but EfficientNet-Lite0-2 here) are timed with their random initialisation (and
their agreement is that of random weights, whose top-1 is rarely a near-tie).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visionzoo  # noqa: E402
from tests.photos import write_augmented  # noqa: E402
from visionzoo.data.loader import available_cpus  # noqa: E402
from visionzoo.data.samples import augmented_photos  # noqa: E402
from visionzoo.runtime.autotune import check_images  # noqa: E402
from visionzoo.runtime.backends import open_runner  # noqa: E402
from visionzoo.runtime.cache import exported_onnx  # noqa: E402
from visionzoo.runtime.measure import describe_machine, interleaved_times  # noqa: E402
from visionzoo.tasks.quantize import quantize  # noqa: E402

MODELS = ("efficientnet_lite0", "resnet50", "mobilenet_v3_large")
INT8 = ("resnet50", "efficientnet_lite0")
OFFLINE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def plain_ort(net: torch.nn.Module, x: torch.Tensor, folder: Path, threads: int):
    """What a user does by hand: torch.onnx.export, then a default ONNX Runtime session."""
    import onnxruntime as ort

    path = folder / "plain.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x[:1],), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    data = x.numpy()
    return lambda: session.run(None, {"input": data})


def openvino_default(path: Path, x: torch.Tensor):
    """What a user does with the exported file and OpenVINO: compile it with the defaults, infer."""
    import openvino as ov

    request = ov.Core().compile_model(str(path), "CPU").create_infer_request()
    data = x.numpy()
    return lambda: request.infer({0: data})[0]


def photo_batch(net, batch: int) -> torch.Tensor:
    """`batch` real photos preprocessed for `net` (augmented with seed 1; the check set's is 0)."""
    transform = net.card.preprocess.transforms()
    return torch.stack([transform(img) for img in augmented_photos(batch, seed=1)])


def contestants(name: str, batch: int, folder: Path, threads: int, calibration: Path | None):
    net = visionzoo.create_model(name, weights="DEFAULT" if name in OFFLINE else None).eval()
    x = photo_batch(net, batch)

    def eager():
        with torch.no_grad():
            return net(x)

    default = open_runner(net, threads=threads, batch_size=len(x))  # auto: measured once, cached
    if hasattr(default, "rows_seen"):  # a recheck runner: count the timed rounds' rows only
        default.rows_seen = default.rows_rechecked = 0
    found = {"vz default": lambda: default.logits(x),
             "openvino default": openvino_default(exported_onnx(net), x),
             "plain ort": plain_ort(net, x, folder, threads), "eager": eager}
    for backend in ("torch", "onnxruntime", "openvino"):
        runner = open_runner(net, backend, threads=threads, precision="fp32")
        found[f"vz {backend}"] = lambda r=runner: r.logits(x)
    if calibration is not None:
        q = quantize(net, calibration, folder / f"{name}.int8.onnx", num_images=200, check=False)
        for backend in ("onnxruntime", "openvino"):
            runner = open_runner(q.path, backend, threads=threads)
            found[f"vz int8 {backend}"] = lambda r=runner: r.logits(x)
    return net, default, found, x


def agreements(net, default) -> tuple[float, float, str]:
    """Top-1 agreement with float32 PyTorch (eager) of the default runner and of OpenVINO's default
    compiled model, on auto's check set."""
    import openvino as ov

    batches, description = check_images(default.info, net)
    compiled = ov.Core().compile_model(str(exported_onnx(net)), "CPU")
    same_default = same_ov = total = 0
    for images in batches:
        with torch.no_grad():
            expected = net(images).argmax(1)
        same_default += int((default.logits(images).argmax(1) == expected).sum())
        same_ov += int((torch.from_numpy(compiled(images.numpy())[0]).argmax(1) == expected).sum())
        total += len(images)
    return same_default / total, same_ov / total, description


def measure(fns: dict, rounds: int) -> dict[str, float]:
    """Seconds per batch, median over `rounds` interleaved rounds."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, rounds).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--int8", default=",".join(INT8), help="models also quantized to int8 ('' for none)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--threads", type=int, default=None, help="compute threads (default: available CPUs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    threads = args.threads or available_cpus()
    torch.set_num_threads(threads)
    print(f"machine: {describe_machine(threads)}")
    print(f"batch {args.batch} of real photos at each model's input size; images/second, median of {args.repeats} "
          f"interleaved rounds\n")
    results, ok = {}, True
    int8_models = {m for m in args.int8.split(",") if m}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("TORCH_HOME", str(tmp / "torch_home"))  # the export cache, thrown away after
        calibration = None
        if int8_models:
            calibration = tmp / "calibration"
            write_augmented(calibration, copies=30, seed=1, originals=False)
        for name in args.models.split(","):
            folder = tmp / name
            folder.mkdir()
            net, default, fns, x = contestants(name, args.batch, folder, threads,
                                               calibration if name in int8_models else None)
            seconds = measure(fns, args.repeats)
            # (a recheck runner counts the rows it ran again: during the timed rounds, on the timed batch)
            rechecked = (default.rows_rechecked / default.rows_seen) if getattr(default, "rows_seen", 0) else None
            speed = {k: args.batch / s for k, s in seconds.items()}
            agree_default, agree_ov, check_set = agreements(net, default)
            results[name] = {"images_per_second": speed, "auto": default.choice.summary() if default.choice else None,
                             "agreement": {"vz default": agree_default, "openvino default": agree_ov}}
            fp32 = {k: v for k, v in speed.items() if k.startswith("vz ") and "int8" not in k}
            best = max((k for k in fp32 if k != "vz default"), key=fp32.get)
            print(f"{name}: default = {default.choice.label if default.choice else default.backend.value}")
            if rechecked is not None:
                print(f"  near ties run again in float32: {rechecked:.1%} of the timed batch")
                results[name]["rechecked"] = rechecked
            if default.choice is not None:
                print(f"  {default.choice.summary()}")
            for k, v in speed.items():
                print(f"  {k:<18} {v:8.1f} img/s")
            print(f"  top-1 agreement with float32 PyTorch on {check_set}: vz default {agree_default:.1%}, "
                  f"openvino default {agree_ov:.1%}")
            checks = [("vz default / openvino default", speed["vz default"] / speed["openvino default"], 0.95),
                      ("vz default top-1 agreement", agree_default, 0.995),
                      (f"fastest float32 ({best}) / plain ort", fp32[best] / speed["plain ort"], 1.0),
                      (f"fastest float32 ({best}) / eager", fp32[best] / speed["eager"], 1.3)]
            int8 = {k: v for k, v in speed.items() if "int8" in k}
            if int8:
                best8 = max(int8, key=int8.get)
                checks.append((f"fastest int8 ({best8}) / plain ort float32", int8[best8] / speed["plain ort"], 2.0))
            for label, ratio, target in checks:
                passed = ratio >= target
                ok &= passed
                print(f"  {label:<52} {ratio:5.3f}{'' if 'agreement' in label else 'x'}  "
                      f"(target >= {target}: {'ok' if passed else 'MISSED'})")
            print(flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(threads), "batch": args.batch,
                                         "models": results}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
