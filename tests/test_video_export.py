"""ONNX export of video classifiers and RAFT, checked through ONNX Runtime."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from visionzoo.data.preprocess import Preprocess
from visionzoo.errors import InputError

from .parity import fill_

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SMALL = Preprocess(36, 32, kind="VideoClassification", mean=(0.45,) * 3, std=(0.225,) * 3, clip_len=4,
                   frame_rate=15, clips=2)


def test_video_classifier_exports_and_runs_in_onnx_runtime(tmp_path):
    import visionzoo
    from visionzoo.runtime.export import read_onnx_info

    model = fill_(visionzoo.create_model("r3d_18", num_classes=3), 0).eval()
    model.card = model.card.replace(preprocess=SMALL, classes=("a", "b", "c"))
    result = visionzoo.export_model(model, "onnx", tmp_path / "r3d.onnx")
    assert max(result.max_rel_diff.values()) < 1e-4 and set(result.max_rel_diff) == {"logits", "embedding"}
    info = read_onnx_info(result.path)
    assert info.task.value == "video" and info.preprocess.clip_len == 4 and info.classes == ("a", "b", "c")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    clips = torch.randn(5, 3, 4, 32, 32)  # another batch size than traced and checked
    logits, embedding = session.run(["logits", "embedding"], {"clips": clips.numpy()})
    with torch.inference_mode():
        expected = model(clips).numpy()
    assert logits.shape == (5, 3) and embedding.shape == (5, 512)
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def test_raft_exports_for_one_frame_size_and_matches_pytorch(tmp_path, monkeypatch):
    import visionzoo
    from visionzoo.runtime import graphs
    from visionzoo.runtime.export import describe, read_onnx_info

    monkeypatch.setattr(graphs, "FLOW_UPDATES", 2)  # the graph unrolls every iteration: 2 export in seconds
    model = fill_(visionzoo.create_model("raft_small"), 0).eval()
    result = visionzoo.export_model(model, "onnx", tmp_path / "raft.onnx", input_size=128)
    assert result.max_rel_diff["flow"] < 1e-4
    info = read_onnx_info(result.path)
    assert info.task.value == "optical_flow" and info.preprocess.resize_hw == (128, 128)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [["batch", 3, 128, 128]] * 2
    g = torch.Generator().manual_seed(3)
    a, b = (torch.rand(1, 3, 128, 128, generator=g) * 2 - 1 for _ in range(2))
    (flow,) = session.run(["flow"], {"image1": a.numpy(), "image2": b.numpy()})
    with torch.inference_mode():
        expected = model(a, b, num_flow_updates=2, all_estimates=False)[-1].numpy()
    assert flow.shape == (1, 2, 128, 128) and np.abs(flow - expected).max() <= 1e-4 * np.abs(expected).max()
    with pytest.raises(InputError, match="multiples of 8"):
        visionzoo.export_model(model, "onnx", tmp_path / "bad.onnx", input_size=130)
    text = describe(result)
    assert "N x 3 x 128 x 128" in text and "verified" in text


def test_video_export_refuses_another_input_size(tmp_path):
    import visionzoo

    model = fill_(visionzoo.create_model("r3d_18", num_classes=3), 0).eval()
    model.card = model.card.replace(preprocess=SMALL, classes=("a", "b", "c"))
    with pytest.raises(InputError, match="clip"):
        visionzoo.export_model(model, "onnx", tmp_path / "r3d.onnx", input_size=64)
