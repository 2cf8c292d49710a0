"""`visionzoo download`, `visionzoo inspect` and the global `--offline` flag."""
from __future__ import annotations

import json

import pytest
import torch

import visionzoo
from visionzoo import cli
from visionzoo.weights.hub import cache_dir

from .cli_runner import run_cli
from .fault_server import FaultServer, record_for, squeezenet_checkpoint


@pytest.fixture
def server():
    with FaultServer() as s:
        yield s


def test_download_command_prefetches_and_reports_where(server, capsys, monkeypatch, tmp_path):
    body, digest, _ = squeezenet_checkpoint(tmp_path)
    record = record_for(server, body, digest, name="cli")
    real = visionzoo.REGISTRY.get_weights
    monkeypatch.setattr(visionzoo.REGISTRY, "get_weights",
                        lambda name, tag=None: record if name == "squeezenet1_1.CLI" else real(name, tag))
    code, out, err = run_cli(capsys, "download", "squeezenet1_1.CLI", "efficientnet_lite0")
    assert code == 0, err
    assert f"downloaded\t{cache_dir() / record.file_name}" in out
    assert "efficientnet_lite0.IMAGENET1K_V1\tpackaged\t" in out
    code, out, _ = run_cli(capsys, "download", "squeezenet1_1.CLI")  # again: verified, no request
    assert code == 0 and "\tcached\t" in out and server.requests[record.file_name] == 1

    # --offline: the packaged one is there, the uncached one is reported (exit 3: partial)
    code, out, err = run_cli(capsys, "--offline", "download", "resnet18", "efficientnet_lite0")
    assert code == cli.EXIT_PARTIAL and "resnet18-f37072fd.pth" in err and "packaged" in out
    code, _, err = run_cli(capsys, "download", "nonet")
    assert code == cli.EXIT_ERROR and "unknown model" in err


def test_inspect_command(capsys, tmp_path):
    path = tmp_path / "r50.pth"
    torch.save({"model": {"model." + k: v for k, v in visionzoo.create_model("resnet50").state_dict().items()}},
               path)
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 0, err
    assert "architecture  resnet50: 100% of keys and shapes match" in out and "torch zip" in out
    code, out, _ = run_cli(capsys, "inspect", path, "--model", "resnet50", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["architecture"] == "resnet50" and data["fit"]["fits"] is True
    assert data["prefixes"] == ["model."] and data["wrapper"] == ["model"]
    code, out, _ = run_cli(capsys, "inspect", path, "--model", "resnet18")
    assert code == cli.EXIT_ERROR and "does not fit" in out and "... and" in out
    code, _, err = run_cli(capsys, "inspect", tmp_path / "missing.pth")
    assert code == cli.EXIT_ERROR and "not found" in err
