"""Faster and Mask R-CNN on the deployment path: the ONNX graph with both stages inside (resize, RPN with
per-level top-k and NonMaxSuppression, RoiAlign per pyramid level, box head, per-class NonMaxSuppression, mask
head), checked against the eager PyTorch model on two photos of different sizes through ONNX Runtime; masks
pasted after the graph; `detect --backend onnxruntime` and `visionzoo export` on a Mask R-CNN.

Weights are random (seeded), at a small input size so that ResNet-50-FPN stays cheap; the score thresholds
are off so that there are detections to compare. The MobileNet variants' random trunk gives every proposal
the same features (and every detection the same score), so there the trunk is re-initialised and the
class logits scaled to a trained model's spread, to give distinct scores.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import visionzoo
from visionzoo.errors import InputError
from visionzoo.runtime.backends import open_runner
from visionzoo.runtime.detection_graph import compare_detections, graph_detections
from visionzoo.runtime.export import export_model, read_onnx_info
from visionzoo.runtime.rcnn_graph import RCNNGraph
from visionzoo.tasks.detect import Detections, detect

from .cli_runner import run_cli as run
from .test_detection_deploy import PHOTOS, RUNTIMES, as_arrays, photo

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("pycocotools.mask")
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),  # pycocotools 2.0 decoding under NumPy 2:
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

SMALL = dict(box_score_thresh=0.0, rpn_score_thresh=0.0, box_detections_per_img=20, min_size=160, max_size=224,
             rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=40)


def build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    net = visionzoo.create_model(name, **{**SMALL, **kwargs}).eval()
    if "mobilenet" in name:  # distinct features per proposal, distinct scores
        g = torch.Generator().manual_seed(0)
        cls_score = net.roi_heads.box_predictor.cls_score
        with torch.no_grad():
            for m in [*net.backbone.body.modules(), cls_score]:
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    gain = 1.0
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (gain / m.weight[0].numel()) ** 0.5)
                    if m.bias is not None:
                        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            # class logits of a trained model's spread (standard deviation 0.5) on a photo
            seen: list[torch.Tensor] = []
            hook = cls_score.register_forward_hook(lambda m, i, o: seen.append(o))
            net([photo(*PHOTOS[0])])
            hook.remove()
            factor = 0.5 / float(torch.cat(seen).std())
            cls_score.weight.mul_(factor)
            cls_score.bias.mul_(factor)
    return net


def outputs_of(det: dict[str, torch.Tensor]) -> tuple[np.ndarray, ...]:
    keys = ("boxes", "scores", "labels", "masks") if "masks" in det else ("boxes", "scores", "labels")
    return tuple(det[k].numpy() for k in keys)


def assert_same_detections(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """A runtime's detections (masks pasted) are the eager model's: the same boxes and labels, scores to 1e-4
    (as sets: see `compare_detections`); masks within 1e-3 on average and thresholded alike on >99% of pixels."""
    assert expected["boxes"].shape[0] >= 5  # something to compare
    assert len(np.unique(expected["scores"].numpy())) >= 0.9 * len(expected["scores"])  # not a comparison of ties
    assert got["labels"].dtype == torch.int64 and got["boxes"].shape == (len(got["scores"]), 4)
    diffs = compare_detections(outputs_of(got), outputs_of(expected))
    assert diffs[0] <= 1e-4 and diffs[1] <= 1e-4 and diffs[2] == 0, diffs
    if "masks" in expected:
        assert got["masks"].shape == expected["masks"].shape  # (the same order here, ties aside)
        assert diffs[3] <= 1e-3, diffs
        same = ((got["masks"] >= 0.5) == (expected["masks"] >= 0.5)).float().mean()
        assert same > 0.99 and (expected["masks"] >= 0.5).any()


def check_onnx(net: nn.Module, path) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for name, size in PHOTOS:
        image = photo(name, size)
        got = graph_detections([torch.from_numpy(a) for a in session.run(names, {"images": image[None].numpy()})],
                               *image.shape[-2:])
        with torch.inference_mode():
            expected = net([image])[0]
        assert_same_detections(got, expected)


@pytest.fixture(scope="module")
def masker():
    return build("maskrcnn_resnet50_fpn")


@pytest.fixture(scope="module")
def masker_onnx(masker, tmp_path_factory):
    return export_model(masker, "onnx", tmp_path_factory.mktemp("onnx") / "maskrcnn.onnx")


def test_mask_rcnn_exports_with_both_stages_in_the_graph(masker, masker_onnx):
    result = masker_onnx
    assert set(result.max_rel_diff) == {"boxes", "scores", "labels", "masks"} and result.worst <= 1e-4
    info = read_onnx_info(result.path)
    assert info.extra_outputs == ("masks",)
    proto = onnx.load(str(result.path))
    ops = Counter(n.op_type for n in proto.graph.node)
    # the proposals' NMS and the detections' NMS; four pyramid levels pooled for the box head and the mask head
    assert ops["NonMaxSuppression"] == 2 and ops["RoiAlign"] == 8
    modes = {a.s.decode() for n in proto.graph.node if n.op_type == "RoiAlign" for a in n.attribute
             if a.name == "coordinate_transformation_mode"}
    assert modes == {"output_half_pixel"}  # torchvision's aligned=False
    record = json.loads({p.key: p.value for p in proto.metadata_props}["visionzoo"])
    assert record["outputs"] == ["boxes", "scores", "labels", "masks"]
    check_onnx(masker, result.path)


def test_the_graph_is_the_model_in_pytorch_too(masker):
    graph = RCNNGraph(masker)
    for name, size in PHOTOS:
        image = photo(name, size)
        with torch.inference_mode():
            got = graph_detections(graph(image[None]), *image.shape[-2:])
            expected = masker([image])[0]
        assert torch.equal(got["boxes"], expected["boxes"]) and torch.equal(got["scores"], expected["scores"])
        assert torch.equal(got["labels"], expected["labels"])
        assert (got["masks"] - expected["masks"]).abs().max() <= 1e-4


@pytest.mark.parametrize("backend", RUNTIMES, ids=lambda b: b.value)
def test_runtime_runners_give_the_detections_with_masks(masker, masker_onnx, backend):
    runner = open_runner(masker_onnx.path, backend, threads=1)
    for name, size in PHOTOS:
        image = photo(name, size)
        with torch.inference_mode():
            expected = masker([image])[0]
        assert_same_detections(graph_detections(runner(image[None]), *image.shape[-2:]), expected)


def test_faster_rcnn_mobilenet_320_exports(tmp_path):
    net = build("fasterrcnn_mobilenet_v3_large_320_fpn", min_size=320, max_size=640)
    result = export_model(net, "onnx", tmp_path / "frcnn320.onnx")
    assert set(result.max_rel_diff) == {"boxes", "scores", "labels"} and result.worst <= 1e-4
    check_onnx(net, result.path)


def test_keypoint_rcnn_is_refused_in_one_line(tmp_path):
    net = visionzoo.create_model("keypointrcnn_resnet50_fpn", min_size=160, max_size=224)
    with pytest.raises(InputError, match="Keypoint R-CNN's heatmap decoding is not in the graph") as caught:
        export_model(net, "onnx", tmp_path / "kp.onnx")
    assert "\n" not in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_detect_on_onnxruntime_gives_the_torch_results_with_masks(masker, masker_onnx, tmp_path):
    from .photos import sample_image

    files = [sample_image("coffee.png"), sample_image("astronaut.png")]
    # one image per forward pass, as on the runtime (in a batch, the smaller image is padded to the larger)
    expected = {r.path: r for r in detect(files, masker, threshold=0.0, batch_size=1)}
    results = detect(files, masker_onnx.path, threshold=0.0, backend="onnxruntime", threads=1,
                     draw_dir=tmp_path / "d")
    assert len(results) == 2
    mask_api = pytest.importorskip("pycocotools.mask")
    for result in results:
        assert isinstance(result, Detections)
        torch_result = expected[result.path]
        assert isinstance(torch_result, Detections) and len(torch_result.boxes) == 20
        diffs = compare_detections(as_arrays(result), as_arrays(torch_result))
        assert diffs[0] <= 1e-4 and diffs[1] <= 1e-4 and diffs[2] == 0, diffs
        assert all(b.mask is not None and b.mask["size"] == [result.height, result.width] for b in result.boxes)
        got = mask_api.decode([b.mask for b in result.boxes])
        want = mask_api.decode([b.mask for b in torch_result.boxes])
        assert got.any() and (got == want).mean() > 0.99  # (the same order: the scores are distinct)
        assert result.drawn is not None


# -- every variant, and the command line (slow: ResNet-50-FPN exports, the full-size Mask R-CNN) -----------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
                                  "fasterrcnn_mobilenet_v3_large_fpn", "maskrcnn_resnet50_fpn_v2"])
def test_every_rcnn_variant_exports_and_matches(name, tmp_path):
    net = build(name)
    result = export_model(net, "onnx", tmp_path / f"{name}.onnx")
    assert result.worst <= 1e-4, result.max_rel_diff
    check_onnx(net, result.path)


@pytest.mark.slow
def test_cli_export_of_mask_rcnn_then_detect_on_onnxruntime(capsys, masker, tmp_path):
    from visionzoo.bundle import save_bundle

    from .photos import sample_image

    classes = [f"thing{i}" for i in range(masker.num_classes)]
    bundle = save_bundle(masker, tmp_path / "bundle", classes=classes, preprocess=masker.card.preprocess)
    onnx_path = tmp_path / "maskrcnn.onnx"
    code, out, err = run(capsys, "export", bundle, "--out", onnx_path)
    assert code == 0, err
    assert "input 1 x 3 x height x width" in out + err and "verified" in out + err
    rows = []
    for model, backend in ((onnx_path, "onnxruntime"), (bundle, "torch")):
        code, out, err = run(capsys, "detect", sample_image("coffee.png"), "--model", model, "--threshold", "0",
                             "--backend", backend, "--threads", "1")
        assert code == 0, err
        (row,) = map(json.loads, out.splitlines())
        rows.append(row["detections"])
    got, want = rows
    assert len(want) == 20 and all("mask" in d for d in got)
    assert all(d["label"] == classes[d["index"]] for d in got)

    def arrays(found):
        return (np.array([d["box"] for d in found]).reshape(-1, 4), np.array([d["score"] for d in found]),
                np.array([d["index"] for d in found]))

    diffs = compare_detections(arrays(got), arrays(want))
    assert diffs[0] <= 1e-4 and diffs[1] <= 1e-4 and diffs[2] == 0, diffs
    mask_api = pytest.importorskip("pycocotools.mask")
    assert (mask_api.decode([d["mask"] for d in got]) == mask_api.decode([d["mask"] for d in want])).mean() > 0.99


@pytest.mark.slow
def test_an_image_without_detections_gives_empty_outputs(tmp_path):
    net = build("maskrcnn_resnet50_fpn", box_score_thresh=0.99)  # (random weights score far below)
    result = export_model(net, "onnx", tmp_path / "none.onnx")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    image = photo(*PHOTOS[0])
    outputs = session.run(None, {"images": image[None].numpy()})
    assert [o.shape for o in outputs] == [(0, 4), (0,), (0,), (0, 1, 28, 28)]
    assert graph_detections([torch.from_numpy(o) for o in outputs], *image.shape[-2:])["masks"].shape == \
        (0, 1, *image.shape[-2:])


def test_mask_rcnn_traces_to_torchscript_through_its_resnet_trunk(masker, tmp_path):
    # the trunk is a zoo ResNet without a model card: tracing probes its attributes with hasattr,
    # which a card property raising InputError broke ("this ResNet has no description")
    from visionzoo.runtime.export import load_torch_export

    result = export_model(masker, "torchscript", tmp_path / "maskrcnn.torchscript")
    module, info = load_torch_export(result.path, "torchscript")
    assert info.extra_outputs == ("masks",)
    name, size = PHOTOS[0]
    image = photo(name, size)
    with torch.inference_mode():
        got = graph_detections(list(module(image[None])), *image.shape[-2:])
        expected = masker([image])[0]
    assert_same_detections(got, expected)
