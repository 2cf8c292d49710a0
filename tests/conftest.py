"""Shared fixtures: parity data, real sample photos, and small generated image folders."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from .parity import PARITY


def pytest_configure(config):
    """Under pytest-xdist (`-n N`, as the README's test command runs) each worker gives torch its
    share of the cores, and so do the commands the tests start: N workers must not each spin all
    the cores' threads (on 2 cores that makes every forward pass wait at barriers)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        share = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(share)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))


@pytest.fixture(scope="session")
def parity_manifest() -> dict:
    return json.loads((PARITY / "manifest.json").read_text())["cases"]


@pytest.fixture(scope="session")
def parity_input() -> np.ndarray:
    return np.load(PARITY / "inputs.npz")["x_2x3x224x224"]


@pytest.fixture(scope="session")
def parity_outputs():
    return np.load(PARITY / "outputs.npz")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a test module of small inputs: as fast as more threads, and much faster
    on a busy machine (no threads spinning at barriers for a descheduled sibling). A module asks for
    it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path_factory, monkeypatch):
    """Never read or write the user's real weights cache from tests. `auto` does not measure
    (`VISIONZOO_AUTOTUNE=0`: torch float32 for a model, as the rule says), since each model a test
    builds would be measured anew: the tests of the measurement (test_autotune.py) switch it on."""
    home = tmp_path_factory.getbasetemp() / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("VISIONZOO_AUTOTUNE", "0")
    monkeypatch.delenv("VISIONZOO_NATIVE_BF16", raising=False)
    import torch.hub

    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    yield
    os.environ.pop("VISIONZOO_OFFLINE", None)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's digits as an ImageFolder of 64x64 PNGs (1797 images, 10 classes), written once."""
    from .digits import write_digits

    return write_digits(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="session")
def digits_small(tmp_path_factory) -> Path:
    """The first 200 digits (about 20 per class): for the mechanics of resume, torchrun, errors."""
    from .digits import write_digits

    return write_digits(tmp_path_factory.mktemp("digits_small") / "digits", limit=200)


@pytest.fixture(scope="session")
def digits_linear_run(digits_dir, tmp_path_factory):
    """(FinetuneResult, images the backbone saw) of one `linear` fine-tune on the digits
    (48x48 crops, one augmented feature pass), trained once per session on one thread. Its
    bundle (`digits_bundle`) is a ready digits classifier for any test that needs one."""
    import time

    import torch

    import visionzoo
    from visionzoo.models.efficientnet import EfficientNet

    seen = {"images": 0}
    real = EfficientNet.forward_features

    def counting(self, x):
        seen["images"] += x.shape[0]
        return real(self, x)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(EfficientNet, "forward_features", counting)
            started = time.perf_counter()
            result = visionzoo.finetune(digits_dir, tmp_path_factory.mktemp("runs") / "digits_linear",
                                        strategy="linear", image_size=48, aug_passes=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    print(f"digits linear run: {time.perf_counter() - started:.1f}s, val acc {result.metrics['val_acc']:.4f}")
    return result, seen["images"]


@pytest.fixture(scope="session")
def digits_bundle(digits_linear_run) -> Path:
    """A fine-tuned digits classifier bundle (EfficientNet-Lite0, 48x48, about 96% accurate)."""
    return digits_linear_run[0].bundle
