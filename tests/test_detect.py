"""`visionzoo detect` and `visionzoo.detect`: images in, one result per image (boxes in its own pixels,
class names, scores), bad files reported, annotated PNGs; a random-weights SSDlite (offline, cheap)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import visionzoo
from visionzoo import InputError
from visionzoo.data.inputs import Failure
from visionzoo.data.loader import prepare_image
from visionzoo.tasks.detect import Detections, detect

from .cli_runner import run_cli as run
from .photos import write_detect_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)  # (few candidates per class: random weights put every box of every class above the threshold)
    return visionzoo.create_model("ssdlite320_mobilenet_v3_large", detections_per_img=20, topk_candidates=10)


@pytest.fixture
def folder(tmp_path):
    """Two real photos of different sizes and a text file renamed .jpg."""
    return write_detect_folder(tmp_path)


def test_detect_gives_the_models_boxes_in_each_images_pixels_and_draws_them(detector, folder, tmp_path):
    drawn = tmp_path / "drawn"
    results = detect(folder, detector, threshold=0.0, draw_dir=drawn, batch_size=2)
    by_name = {r.path.rsplit("/", 1)[-1]: r for r in results}
    assert set(by_name) == {"coffee.png", "rocket.jpg", "notes.jpg"}
    assert isinstance(by_name["notes.jpg"], Failure)
    for name in ("coffee.png", "rocket.jpg"):
        result = by_name[name]
        assert isinstance(result, Detections)
        with Image.open(folder / name) as img:
            assert (result.width, result.height) == img.size
        image = prepare_image(folder / name, detector.card.preprocess.transforms())[0]
        with torch.inference_mode():
            expected = detector([image])[0]
        assert len(result.boxes) == expected["boxes"].shape[0] == 20
        got = torch.tensor([[b.x1, b.y1, b.x2, b.y2] for b in result.boxes])
        assert torch.allclose(got, expected["boxes"], atol=1e-3)
        assert [b.index for b in result.boxes] == expected["labels"].tolist()
        scores = [b.score for b in result.boxes]
        assert scores == sorted(scores, reverse=True)
        assert all(0 <= b.x1 <= b.x2 <= result.width and 0 <= b.y1 <= b.y2 <= result.height for b in result.boxes)
        assert all(b.label == f"class_{b.index}" for b in result.boxes)  # built without weights: no class names
        with Image.open(result.drawn) as png:
            assert png.format == "PNG" and png.size == (result.width, result.height)
            assert png.convert("RGB").tobytes() != Image.open(folder / name).convert("RGB").tobytes()
    # a threshold above every score keeps nothing
    assert detect(folder / "coffee.png", detector, threshold=1.0)[0].boxes == ()


def test_detect_refuses_what_it_cannot_do(detector, folder):
    with pytest.raises(InputError, match="threshold"):
        detect(folder, detector, threshold=1.5)
    with pytest.raises(InputError, match="fp32 only"):
        detect(folder, detector, precision="bf16")
    with pytest.raises(InputError, match="no such model file"):
        detect(folder, folder / "missing.onnx")
    with pytest.raises(InputError, match="needs a detector"):
        detect(folder, visionzoo.create_model("resnet18"))


def test_cli_detect_prints_json_lines_with_coco_names_and_exits_partial(capsys, detector, folder, tmp_path):
    weights = tmp_path / "ssdlite.pth"
    torch.save(detector.state_dict(), weights)
    code, out, err = run(capsys, "detect", folder, "--model", "ssdlite320_mobilenet_v3_large", "--weights", weights,
                         "--threshold", "0", "--out", tmp_path / "drawn", "--threads", "1")
    assert code == 3, err  # one file failed
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rows) == ["coffee.png", "rocket.jpg"]
    coco = visionzoo.get_weights("ssdlite320_mobilenet_v3_large").categories
    for row in rows:
        assert len(row["detections"]) == 300  # random weights: every candidate is above 0
        for d in row["detections"][:5]:
            assert len(d["box"]) == 4 and d["label"] == coco[d["index"]] and 0 <= d["score"] <= 1
        assert (tmp_path / "drawn" / row["drawn"].rsplit("/", 1)[-1]).is_file()
    assert "notes.jpg" in err and "2 detected, 1 failed" in err
    # the same boxes as COCO results, the format COCOeval reads: x, y, width, height per image id
    results = json.loads((tmp_path / "drawn" / "coco_results.json").read_text())
    assert len(results) == sum(len(r["detections"]) for r in rows) == 600
    by_file = {r["path"]: i for i, r in enumerate(rows)}
    for res in results[::50]:
        row = rows[by_file[res["file_name"]]]
        assert res["image_id"] == by_file[res["file_name"]] + 1
        match = [d for d in row["detections"] if d["index"] == res["category_id"]
                 and abs(d["score"] - res["score"]) < 1e-5]
        assert any(res["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
                   for x1, y1, x2, y2 in (d["box"] for d in match)), res
