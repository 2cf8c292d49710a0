"""Detectors on the deployment path: the ONNX graph with the post-processing inside (resize, heads, decoding,
NonMaxSuppression), checked against the PyTorch model on real photos of different sizes through ONNX Runtime
and OpenVINO; `visionzoo export`, `detect --backend onnxruntime|openvino` and `benchmark` on it.

Weights are random (the published detection weights are not offline), made decisive: a freshly initialised
detector scores every box of every class almost the same (SSDlite's trunk starts with tiny weights, RetinaNet's
class bias puts every score at 0.01), and equal scores would make any comparison a comparison of tie orders.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import visionzoo
from visionzoo.data.loader import prepare_image
from visionzoo.enums import Task
from visionzoo.errors import InputError
from visionzoo.runtime.backends import Backend, installed_backends, open_runner
from visionzoo.runtime.detection_graph import DetectorGraph, compare_detections
from visionzoo.runtime.export import export_model, read_onnx_info
from visionzoo.tasks.detect import Detections, detect

from .cli_runner import run_cli as run
from .photos import sample_image, write_detect_folder

pytest.importorskip("onnxruntime")
RUNTIMES = [b for b in (Backend.ONNXRUNTIME, Backend.OPENVINO) if b in installed_backends()]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


def _output_convs(head: nn.Module, columns: int) -> list[nn.Conv2d]:
    """A head's output convolutions (one output per class or box side and anchor): not the towers or the
    depthwise layers, which keep their width."""
    return [m for m in head.modules() if isinstance(m, nn.Conv2d) and m.groups == 1
            and m.out_channels != m.in_channels and m.out_channels % columns == 0]


def decisive(net: nn.Module, seed: int = 0, *, whole: bool = True) -> nn.Module:
    """`net` with weights that give distinct scores: every convolution He-initialised (`whole`; else only
    the class head's, for a pretrained backbone), then the heads' outputs scaled, on a real photo, to the
    spread of a trained model's (class logits of standard deviation 0.5, box deltas 0.2) so that scores
    neither saturate nor tie."""
    g = torch.Generator().manual_seed(seed)
    net.eval()
    with torch.no_grad():
        for module in (net if whole else net.head.classification_head).modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
        for head, columns, spread in ((net.head.classification_head, net.num_classes, 0.5),
                                      (net.head.regression_head, 4, 0.2)):
            convs = _output_convs(head, columns)
            seen: dict[nn.Conv2d, list[torch.Tensor]] = {conv: [] for conv in convs}
            hooks = [conv.register_forward_hook(lambda m, i, o, seen=seen: seen[m].append(o)) for conv in convs]
            net([photo("chelsea.png", (240, 320))])
            for hook in hooks:
                hook.remove()
            for conv, outputs in seen.items():
                std = float(torch.cat([o.flatten() for o in outputs]).std())
                conv.weight.mul_(spread / max(std, 1e-6))
                if conv.bias is not None:
                    conv.bias.mul_(spread / max(std, 1e-6))
    return net


def photo(name: str, size: tuple[int, int]) -> torch.Tensor:
    """A sample photo resized to (height, width), as a (3, H, W) tensor in [0, 1]."""
    from PIL import Image

    with Image.open(sample_image(name)) as img:
        pixels = np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


# two photos of different sizes and aspect ratios (a landscape and a portrait one)
PHOTOS = (("coffee.png", (300, 451)), ("astronaut.png", (283, 205)))


def assert_same_detections(got, net, image: torch.Tensor, min_count: int = 5) -> None:
    """`got` (boxes, scores, labels from a runtime) are `net`'s eager detections on `image`: the same boxes
    and labels, the scores to 1e-4 (compared as sets: see `compare_detections`)."""
    with torch.inference_mode():
        expected = net([image])[0]
    assert expected["boxes"].shape[0] >= min_count  # something to compare
    assert len(np.unique(expected["scores"].numpy())) >= 0.9 * len(expected["scores"])  # not a comparison of ties
    got = [np.asarray(t) for t in got]
    assert got[2].dtype == np.int64 and got[0].shape == (len(got[1]), 4)
    diffs = compare_detections(tuple(got), (expected["boxes"].numpy(), expected["scores"].numpy(),
                                            expected["labels"].numpy()))
    assert diffs[0] <= 1e-4 and diffs[1] <= 1e-4 and diffs[2] == 0, diffs
    # most agree in order too (ties and last-bit differences at the cuts aside)
    n = min(len(got[2]), len(expected["labels"]))
    assert (got[2][:n] == expected["labels"].numpy()[:n]).mean() > 0.9


def check_onnx(net, path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for name, size in PHOTOS:
        image = photo(name, size)
        assert_same_detections(session.run(["boxes", "scores", "labels"], {"images": image[None].numpy()}), net,
                               image)


@pytest.fixture(scope="module")
def ssdlite():
    torch.manual_seed(0)
    return decisive(visionzoo.create_model("ssdlite320_mobilenet_v3_large", detections_per_img=50))


@pytest.fixture(scope="module")
def ssdlite_onnx(ssdlite, tmp_path_factory):
    return export_model(ssdlite, "onnx", tmp_path_factory.mktemp("onnx") / "ssdlite.onnx")


@pytest.fixture(scope="module")
def lite0_retinanet():
    """RetinaNet on EfficientNet-Lite0 (real ImageNet weights) at a small size: the resize and the pyramid's
    sizes follow each image in the graph."""
    torch.manual_seed(0)
    net = visionzoo.create_model("retinanet", backbone="efficientnet_lite0", pretrained_backbone=True, num_classes=5,
                                 min_size=160, max_size=256, detections_per_img=50)
    return decisive(net, whole=False)


def test_ssdlite320_exports_with_its_post_processing(ssdlite, ssdlite_onnx):
    result = ssdlite_onnx
    assert set(result.max_rel_diff) == {"boxes", "scores", "labels"} and result.worst <= 1e-4
    info = read_onnx_info(result.path)
    assert info.task is Task.DETECTION and info.input_size is None and info.num_classes == 91
    proto = onnx.load(str(result.path))
    assert [n.op_type for n in proto.graph.node].count("NonMaxSuppression") == 1
    assert "Resize" in {n.op_type for n in proto.graph.node}  # the transform is in the graph
    record = json.loads({p.key: p.value for p in proto.metadata_props}["visionzoo"])
    assert record["outputs"] == ["boxes", "scores", "labels"] and record["inputs"] == "images"
    check_onnx(ssdlite, result.path)


def test_a_composed_detector_exports_with_a_free_image_size(lite0_retinanet, tmp_path):
    result = export_model(lite0_retinanet, "onnx", tmp_path / "retinanet_lite0.onnx")
    assert result.worst <= 1e-4, result.max_rel_diff
    check_onnx(lite0_retinanet, result.path)


def test_the_graph_is_the_model_in_pytorch_too(lite0_retinanet):
    # the traced function itself, eagerly: the same detections as the model's own forward, bit for bit (equal
    # scores may come in another order: the graph takes the top-k before the threshold, the model after)
    graph = DetectorGraph(lite0_retinanet)

    def rows(boxes, scores, labels):
        return sorted(zip(labels.tolist(), scores.tolist(), map(tuple, boxes.tolist()), strict=True))

    for name, size in PHOTOS:
        image = photo(name, size)
        with torch.inference_mode():
            got = graph(image[None])
            expected = lite0_retinanet([image])[0]
        assert torch.equal(got[1], expected["scores"])
        assert rows(*got) == rows(expected["boxes"], expected["scores"], expected["labels"])


@pytest.mark.parametrize("backend", RUNTIMES, ids=lambda b: b.value)
def test_runtime_runners_give_the_detections(ssdlite, ssdlite_onnx, backend):
    runner = open_runner(ssdlite_onnx.path, backend, threads=1)
    assert runner.task is Task.DETECTION
    for name, size in PHOTOS:
        image = photo(name, size)
        assert_same_detections(runner(image[None]), ssdlite, image)
    with pytest.raises(InputError, match=r"takes \(1, 3, height, width\) batches"):
        runner(torch.zeros(2, 3, 64, 64))


def test_what_does_not_export_is_refused(tmp_path):
    with pytest.raises(InputError, match="takes inputs of any height and width"):
        export_model(visionzoo.create_model("ssdlite320_mobilenet_v3_large"), "onnx", tmp_path / "x.onnx",
                     input_size=320)
    assert not list(tmp_path.iterdir())


@pytest.fixture
def folder(tmp_path):
    return write_detect_folder(tmp_path)


def as_arrays(result: Detections) -> tuple[np.ndarray, ...]:
    return (np.array([[b.x1, b.y1, b.x2, b.y2] for b in result.boxes]).reshape(-1, 4),
            np.array([b.score for b in result.boxes]), np.array([b.index for b in result.boxes]))


@pytest.mark.parametrize("backend", RUNTIMES, ids=lambda b: b.value)
def test_detect_on_a_runtime_gives_the_torch_results(ssdlite, ssdlite_onnx, folder, backend, tmp_path):
    torch_results = {r.path: r for r in detect(folder, ssdlite, threshold=0.0)}
    results = detect(folder, ssdlite_onnx.path, threshold=0.0, backend=backend, threads=1, draw_dir=tmp_path / "d")
    assert len(results) == 3
    for result in results:
        expected = torch_results[result.path]
        if not isinstance(result, Detections):
            assert not isinstance(expected, Detections) and result.path.endswith("notes.jpg")
            continue
        assert isinstance(expected, Detections) and (result.width, result.height) == (expected.width, expected.height)
        assert len(expected.boxes) == 50  # detections_per_img
        diffs = compare_detections(as_arrays(result), as_arrays(expected))
        assert diffs[0] <= 1e-4 and diffs[1] <= 1e-4 and diffs[2] == 0, diffs
        assert all(b.label == f"class_{b.index}" for b in result.boxes)
        assert result.drawn is not None and (tmp_path / "d" / result.drawn.rsplit("/", 1)[-1]).is_file()


def test_cli_detect_with_backend_onnxruntime_exports_once_and_caches(capsys, ssdlite, folder, tmp_path):
    weights = tmp_path / "ssdlite.pth"
    torch.save(ssdlite.state_dict(), weights)
    args = ("detect", folder, "--model", "ssdlite320_mobilenet_v3_large", "--weights", weights, "--threshold", "0",
            "--backend", "onnxruntime", "--threads", "1")
    code, out, err = run(capsys, *args)
    assert code == 3, err  # one file failed, as on the torch backend
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in map(json.loads, out.splitlines())}
    assert sorted(rows) == ["coffee.png", "rocket.jpg"] and "notes.jpg" in err and "2 detected, 1 failed" in err
    image = prepare_image(folder / "coffee.png", ssdlite.card.preprocess.transforms())[0]
    same = visionzoo.create_model("ssdlite320_mobilenet_v3_large", weights=weights).eval()  # (300 per image)
    with torch.inference_mode():
        expected = same([image])[0]
    coco = visionzoo.get_weights("ssdlite320_mobilenet_v3_large").categories
    found = rows["coffee.png"]["detections"]
    assert len(found) == 300
    got = (np.array([d["box"] for d in found]), np.array([d["score"] for d in found]),
           np.array([d["index"] for d in found]))
    diffs = compare_detections(got, (expected["boxes"].numpy(), expected["scores"].numpy(),
                                     expected["labels"].numpy()))
    assert diffs[0] <= 1e-4 and diffs[1] <= 1e-4 and diffs[2] == 0, diffs
    assert all(d["label"] == coco[d["index"]] for d in found)
    code, again, err = run(capsys, *args)  # the export is cached: no second export
    assert code == 3 and "exporting" not in err.lower() and again == out


def test_benchmark_times_a_detector_on_a_runtime(capsys, ssdlite_onnx, tmp_path):
    report = tmp_path / "bench.json"
    code, out, err = run(capsys, "benchmark", ssdlite_onnx.path, "--backends", ",".join(b.value for b in RUNTIMES),
                         "--repeats", "2", "--warmup", "1", "--threads", "1", "--json", report)
    assert code == 0, err
    rows = json.loads(report.read_text())["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [(b.value, 1) for b in RUNTIMES]
    assert all(r["throughput"] > 0 and r["p50_ms"] > 0 for r in rows)


# -- every published detector, and the other composed heads (slow: ResNet-50 and VGG-16 at full size) ------------

@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", [
    ("retinanet_resnet50_fpn", {"min_size": 320, "max_size": 480}),
    ("retinanet_resnet50_fpn_v2", {"min_size": 320, "max_size": 480}),
    ("fcos_resnet50_fpn", {"min_size": 320, "max_size": 480}),
    ("ssd300_vgg16", {}),
    ("fcos", {"backbone": "efficientnet_lite0", "pretrained_backbone": True, "num_classes": 5, "min_size": 192}),
    ("ssdlite", {"backbone": "efficientnet_lite0", "pretrained_backbone": True, "num_classes": 5, "size": 256}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_detector_exports_and_matches(name, kwargs, tmp_path):
    torch.manual_seed(0)
    net = decisive(visionzoo.create_model(name, detections_per_img=50, **kwargs), whole="backbone" not in kwargs)
    result = export_model(net, "onnx", tmp_path / f"{name}.onnx")
    assert result.worst <= 1e-4, result.max_rel_diff
    check_onnx(net, result.path)


@pytest.mark.slow
def test_openvino_runs_a_composed_detector_of_any_size(lite0_retinanet):
    if Backend.OPENVINO not in RUNTIMES:
        pytest.skip("openvino is not installed")
    runner = open_runner(lite0_retinanet, "openvino", threads=1)
    for name, size in PHOTOS:
        image = photo(name, size)
        assert_same_detections(runner(image[None]), lite0_retinanet, image)


@pytest.mark.slow
def test_cli_export_of_a_detector_bundle_then_detect_with_the_file(capsys, ssdlite, folder, tmp_path):
    from visionzoo.bundle import save_bundle

    classes = [f"thing{i}" for i in range(ssdlite.num_classes)]
    bundle = save_bundle(ssdlite, tmp_path / "bundle", classes=classes, preprocess=ssdlite.card.preprocess)
    code, out, err = run(capsys, "export", bundle, "--out", tmp_path / "det.onnx")
    assert code == 0, err
    assert "input 1 x 3 x height x width" in out + err and "verified" in out + err
    code, out, err = run(capsys, "detect", folder / "coffee.png", "--model", tmp_path / "det.onnx", "--threshold", "0")
    assert code == 0, err
    (row,) = map(json.loads, out.splitlines())
    assert len(row["detections"]) == 50 and all(d["label"] == classes[d["index"]] for d in row["detections"])
