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


def test_raft_exports_for_one_frame_size_and_matches_pytorch(tmp_path):
    import visionzoo
    from visionzoo.runtime.export import ExportFormat, ExportResult, read_onnx_info
    from visionzoo.runtime.task_export import describe_export, export_task_onnx

    model = fill_(visionzoo.create_model("raft_small"), 0).eval()
    result = export_task_onnx(model, tmp_path / "raft.onnx", flow_size=(128, 136), updates=2)
    assert result.inputs == {"image1": ("batch", 3, 128, 136), "image2": ("batch", 3, 128, 136)}
    assert result.max_rel_diff["flow"] < 1e-4
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(3)
    a, b = (torch.rand(1, 3, 128, 136, generator=g) * 2 - 1 for _ in range(2))
    (flow,) = session.run(["flow"], {"image1": a.numpy(), "image2": b.numpy()})
    with torch.inference_mode():
        expected = model(a, b, num_flow_updates=2, all_estimates=False)[-1].numpy()
    assert flow.shape == (1, 2, 128, 136) and np.abs(flow - expected).max() <= 1e-4 * np.abs(expected).max()
    with pytest.raises(InputError, match="multiples of 8"):
        export_task_onnx(model, tmp_path / "bad.onnx", flow_size=(130, 160))
    text = describe_export(ExportResult(result.path, ExportFormat.ONNX, read_onnx_info(result.path),
                                        result.max_rel_diff, "torch.onnx"))
    assert "image1 N x 3 x 128 x 136" in text and "verified" in text
    with pytest.raises(InputError, match="exports to ONNX"):
        visionzoo.export_model(model, "torchscript", tmp_path / "raft.pt")
