"""The process the fuzz tests (`test_fuzz.py`) feed hostile files to, inside a memory limit.

Run as `python fuzz_worker.py HEADROOM`: it imports everything, warms up, then caps its own
address space at what it uses plus HEADROOM bytes (`resource.setrlimit`), so that a decode that
breaks its budget fails here, with a MemoryError, instead of taking the machine. Then it reads
requests from stdin (a JSON line `{"target": ..., "size": n}` followed by n bytes) and answers
each with a JSON line: `{"outcome": "ok" | "refused" | "crash", "error": type, "message": text}`.

- "ok": the file was read (and, for an image, preprocessed);
- "refused": the reader raised the user-facing error it should (`ImageError`, `CheckpointError`,
  ... : one line naming the problem);
- "crash": anything else: another exception type, a message of several lines, or running out of
  memory (an `ImageError` saying so counts: the budget should have refused the file first).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import traceback
from pathlib import Path

import torch

# the decode budget the image target runs with: small, so that the memory cap can be small too
FUZZ_LIMITS = "pixels=50M,resized=4M,bytes=128MiB,frames=1000"


def main() -> None:
    headroom = int(sys.argv[1])
    torch.set_num_threads(1)
    from visionzoo.data.images import DecodeLimits

    work = Path(tempfile.mkdtemp(prefix="visionzoo-fuzz-"))
    targets = {"image": ImageTarget(work, DecodeLimits.parse(FUZZ_LIMITS)), "safetensors": SafetensorsTarget(work),
               "bundle": BundleTarget(work)}
    for target in targets.values():
        target.warm_up()
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + headroom,) * 2)
    stdin, stdout = sys.stdin.buffer, sys.stdout
    stdout.write(json.dumps({"ready": True, "limit": _address_space() + headroom,
                             "bundle_json": targets["bundle"].good.decode()}) + "\n")
    stdout.flush()
    while True:
        line = stdin.readline()
        if not line:
            return
        request = json.loads(line)
        data = stdin.read(request["size"])
        stdout.write(json.dumps({**targets[request["target"]].answer(data), "vm": _address_space()}) + "\n")
        stdout.flush()


def _peak_address_space() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmPeak:")).split()[1]) * 1024


def _address_space() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmSize:")).split()[1]) * 1024


class Target:
    expected: tuple[type[BaseException], ...] = ()

    def run(self, data: bytes) -> dict:
        raise NotImplementedError

    def warm_up(self) -> None:
        pass

    def answer(self, data: bytes) -> dict:
        try:
            return {"outcome": "ok", **self.run(data)}
        except self.expected as e:
            message = str(e)
            if "\n" in message or "not enough memory" in message:
                # the reader hid the cause (`from None`); its context still says where memory ran out
                cause = e.__cause__ or e.__context__
                where = "".join(traceback.format_exception(cause))[-3000:] if cause is not None else ""
                return {"outcome": "crash", "error": type(e).__name__, "message": message, "traceback": where,
                        "vm_peak": _peak_address_space()}
            return {"outcome": "refused", "error": type(e).__name__, "message": message}
        except BaseException as e:  # noqa: BLE001 - every other outcome is what the fuzzing looks for
            return {"outcome": "crash", "error": type(e).__name__, "message": str(e)[:500],
                    "traceback": traceback.format_exc()[-3000:]}


class ImageTarget(Target):
    """Decode within the budget and preprocess as predict does (a 256 resize, a 224 crop)."""

    def __init__(self, work: Path, limits):
        from visionzoo.data.preprocess import DEFAULT_PREPROCESS
        from visionzoo.errors import ImageError

        self.path, self.limits = work / "image", limits
        self.transform = DEFAULT_PREPROCESS.transforms()
        self.expected = (ImageError,)

    def warm_up(self) -> None:
        from PIL import Image

        for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
            with open(self.path, "wb") as f:
                Image.new("RGB", (8, 8)).save(f, fmt)
            self.run(self.path.read_bytes())

    def run(self, data: bytes) -> dict:
        from visionzoo.data.images import load_image

        self.path.write_bytes(data)
        img = load_image(self.path, limits=self.limits, resize_to=256)
        x = self.transform(img)
        if tuple(x.shape) != (3, 224, 224) or not bool(torch.isfinite(x).all()):
            raise AssertionError(f"preprocessed to {tuple(x.shape)}, finite: {bool(torch.isfinite(x).all())}")
        return {"size": list(img.size)}


class SafetensorsTarget(Target):
    """Our reader, and the reference reader on the same bytes."""

    def __init__(self, work: Path):
        from visionzoo.errors import CheckpointError

        self.path = work / "weights.safetensors"
        self.expected = (CheckpointError,)

    def warm_up(self) -> None:
        from safetensors.torch import save_file

        save_file({"a": torch.zeros(2)}, str(self.path))
        self.run(self.path.read_bytes())

    def run(self, data: bytes) -> dict:
        from visionzoo.weights.io import load_file

        self.path.write_bytes(data)
        reference = self._reference()
        tensors = load_file(self.path)
        if not isinstance(reference, dict):
            raise AssertionError(f"accepted a file that the reference reader refuses ({reference})")
        if sorted(tensors) != sorted(reference) or not all(
                tensors[k].dtype == reference[k].dtype and tensors[k].shape == reference[k].shape
                and _raw(tensors[k]) == _raw(reference[k]) for k in tensors):
            raise AssertionError("read other tensors than the reference reader")
        return {"tensors": len(tensors)}

    def _reference(self):
        try:
            from safetensors.torch import load_file

            return load_file(str(self.path))
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {str(e)[:200]}"

    def answer(self, data: bytes) -> dict:
        result = super().answer(data)
        if result["outcome"] == "refused":
            ref = self._reference()
            result["reference"] = "accepted" if isinstance(ref, dict) else ref
        return result


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes (NaNs compare equal here, as they should: the same bits were read)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class BundleTarget(Target):
    """`create_model` on a bundle whose bundle.json is the fuzzed text (its weights are real)."""

    def __init__(self, work: Path):
        from visionzoo.errors import VisionZooError

        self.folder = work / "bundle"
        self.expected = (VisionZooError,)

    def warm_up(self) -> None:
        import visionzoo
        from visionzoo.bundle import save_bundle
        from visionzoo.data.preprocess import Preprocess

        torch.manual_seed(0)
        model = visionzoo.create_model("mobilenet_v3_small", num_classes=2)
        save_bundle(model, self.folder, classes=["cat", "dog"], preprocess=Preprocess(64, 56),
                    architecture="mobilenet_v3_small")
        self.good = (self.folder / "bundle.json").read_bytes()
        self.run(self.good)

    def run(self, data: bytes) -> dict:
        import visionzoo

        (self.folder / "bundle.json").write_bytes(data)
        model = visionzoo.create_model(self.folder)
        card = model.require_card()
        if model.num_classes != len(card.classes or ()):
            raise AssertionError(f"{model.num_classes} outputs for {len(card.classes or ())} classes")
        from visionzoo.runtime.backends import TorchRunner

        TorchRunner(model)  # what predict runs: refuses a model that cannot take RGB images
        return {"classes": len(card.classes or ())}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
