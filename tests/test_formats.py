"""Every file format we read is checked as strictly as its reference reader (issue 13): safetensors
headers, bundle.json against its schema, ONNX files whose data lie outside their folder. Each
hostile file is one clean error line, never a traceback and never gigabytes."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import visionzoo
from visionzoo.bundle import read_bundle, save_bundle
from visionzoo.data.preprocess import MAX_SIZE, Preprocess
from visionzoo.errors import CheckpointError, InputError
from visionzoo.weights import safetensors_file
from visionzoo.weights.io import load_file

from .hostile import one_line_errors, run_limited
from .photos import sample_image

# -- safetensors ----------------------------------------------------------------------------------

def safetensors_bytes(header: dict | str, data: bytes = b"") -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]}}
HOSTILE_SAFETENSORS = {
    # overlapping ranges: a 4 MiB file read as 1000 tensors of 4 MiB each (1.97 GB in `inspect`)
    "overlapping": ({f"t{i}": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}
                     for i in range(1000)}, bytes(4 << 20), "overlaps"),
    "gap": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "gap"),
    "trailing bytes": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8), "holds 8"),
    "list dtype": ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "dtype"),
    "list metadata": ({"__metadata__": ["x"], **GOOD}, bytes(16), "__metadata__"),
    "metadata of numbers": ({"__metadata__": {"k": 1}, **GOOD}, bytes(16), "__metadata__"),
    "1e999 in a shape": ('{"a": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}}', bytes(4),
                         "not an integer"),
    "1e999 in an offset": ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e999]}}', bytes(4),
                           "not an integer"),
    "negative shape": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "shape"),
    "boolean offset": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}}, bytes(4), "data_offsets"),
    "three offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, bytes(4), "data_offsets"),
    "huge shape": ({"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 4]}}, bytes(4),
                   "needs"),
    "duplicate names": ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                        '"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4), "duplicate"),
    "NaN": ('{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', bytes(4), "not an integer"),
    "not an object": ("[1, 2]", b"", "start"),
    "entry not an object": ({"a": 3}, b"", "not an object"),
}


def test_a_good_header_reads(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(safetensors_bytes({"__metadata__": {"k": "v"}, **GOOD},
                                       struct.pack("<2f", 1.5, 2.5) + struct.pack("<q", 7)))
    tensors, metadata = safetensors_file.read(path)
    assert tensors["a"].tolist() == [1.5, 2.5] and tensors["b"].tolist() == [7] and metadata == {"k": "v"}


@pytest.mark.parametrize("case", sorted(HOSTILE_SAFETENSORS))
def test_hostile_safetensors_headers_are_one_line_errors(tmp_path, case):
    header, data, words = HOSTILE_SAFETENSORS[case]
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    with pytest.raises(safetensors_file.SafetensorsError, match=words):
        safetensors_file.read(path)
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as e:
        load_file(path)
    assert "\n" not in str(e.value)
    # the reference reader refuses each of them too (the duplicate-name file it reads, keeping one)
    safetensors = pytest.importorskip("safetensors.torch")
    if case != "duplicate names":
        with pytest.raises(Exception):  # noqa: B017 - the reference raises its own types
            safetensors.load_file(str(path))


def test_the_overlapping_file_is_refused_under_2gb(tmp_path):
    header, data, _ = HOSTILE_SAFETENSORS["overlapping"]
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    run = run_limited("inspect", path, timeout=300)
    assert run.returncode == 1
    lines = one_line_errors(run.stderr)
    assert len(lines) == 1 and "overlaps" in lines[0]


# -- bundle.json ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    """A two-class MobileNetV3-Small bundle (random weights: only the format matters here)."""
    torch.manual_seed(0)
    model = visionzoo.create_model("mobilenet_v3_small", num_classes=2)
    return save_bundle(model, tmp_path_factory.mktemp("bundles") / "small", classes=["cat", "dog"],
                       preprocess=Preprocess(64, 56), architecture="mobilenet_v3_small")


def _edit(meta: dict, path: str, value) -> dict:
    """`meta` with the field at the dotted `path` set to `value` (`...` deletes it)."""
    meta = json.loads(json.dumps(meta))
    *parents, leaf = path.split(".")
    node = meta
    for key in parents:
        node = node[key]
    if value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    return meta


# (field, value, words the error must contain): it always names the field
HOSTILE_BUNDLES = [
    ("format_version", "abc", "format_version"),
    ("format_version", [2], "format_version"),
    ("format_version", 99, "newer visionzoo"),
    ("builder_kwargs", {"no_such_argument": 1}, "no_such_argument"),
    ("builder_kwargs", {"dropout": "high"}, "dropout"),
    ("builder_kwargs", {"in_chans": 10**9}, "builder_kwargs"),
    ("builder_kwargs", [1, 2], "builder_kwargs"),
    ("preprocess.interpolation", "evil", "interpolation"),
    ("preprocess.resize_size", 0, "resize_size"),
    ("preprocess.crop_size", 60000, "crop_size"),
    ("preprocess.resize_size", 60000, "resize_size"),
    ("preprocess.std", [0.2, 0.0, 0.2], "std"),
    ("preprocess.mean", [0.5, "x", 0.5], "mean"),
    ("preprocess", [256, 224], "preprocess"),
    ("structure", {"modules": []}, "structure"),
    ("structure", {"modules": {"features.0.0": {"forward": 3}}}, "forward"),
    ("structure", {"modules": {"features.0.0": {"out_channels": -5}}}, "structure"),
    ("structure", {"feature_chs": "many"}, "feature_chs"),
    ("classes", "cat,dog", "classes"),
    ("classes", [1, 2], "classes"),
    ("classes", ..., "classes"),
    ("num_classes", 3, "num_classes"),
    ("architecture", ["resnet50"], "architecture"),
    ("weights_sha256", 7, "weights_sha256"),
    ("weights_file", "../../elsewhere.safetensors", "weights_file"),
    ("history", {"epoch": 1}, "history"),
]


@pytest.mark.parametrize("field,value,words", HOSTILE_BUNDLES, ids=lambda v: str(v)[:20])
def test_hostile_bundle_descriptions_are_one_line_errors(small_bundle, tmp_path, field, value, words):
    bundle = tmp_path / "b"
    shutil.copytree(small_bundle, bundle)
    meta = json.loads((small_bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps(_edit(meta, field, value)))
    with pytest.raises(CheckpointError, match=words) as e:
        visionzoo.create_model(bundle)
    assert "\n" not in str(e.value) and str(bundle) in str(e.value)


def test_the_untouched_bundle_loads(small_bundle):
    info = read_bundle(small_bundle)
    assert info.classes == ("cat", "dog") and info.preprocess == Preprocess(64, 56)
    assert visionzoo.create_model(small_bundle).num_classes == 2


def test_unparsable_bundle_json_is_one_line(small_bundle, tmp_path):
    for text in ("{", "[" * 100_000, '{"format": "visionzoo.bundle", "format_version": 1e999}', "\xff"):
        bundle = tmp_path / "b"
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.copytree(small_bundle, bundle)
        (bundle / "bundle.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(CheckpointError) as e:
            read_bundle(bundle)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit", [("preprocess.resize_size", 60000), ("preprocess.std", [0.2, 0.0, 0.2])])
def test_the_issues_bundles_are_refused_by_predict_under_2gb(small_bundle, tmp_path, edit):
    """Sizes of 60000 drove predict to 17.6 GB; a std of 0 gave NaN probabilities with exit 0."""
    bundle = tmp_path / "b"
    shutil.copytree(small_bundle, bundle)
    meta = json.loads((small_bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps(_edit(meta, *edit)))
    run = run_limited("predict", sample_image("coffee.png"), "--model", bundle, timeout=300)
    assert run.returncode == 1 and run.stdout == ""
    lines = one_line_errors(run.stderr)
    assert len(lines) == 1 and edit[0].split(".")[-1] in lines[0], lines


def test_preprocessing_is_checked_wherever_it_is_made():
    with pytest.raises(InputError, match="resize_size"):
        Preprocess(MAX_SIZE + 1, 224)
    with pytest.raises(InputError, match="std"):
        Preprocess(256, 224, std=(0.2, float("nan"), 0.2))
    with pytest.raises(InputError, match="interpolation"):
        Preprocess.from_dict({"resize_size": 256, "crop_size": 224, "interpolation": "lanczos"})
    assert Preprocess.from_dict({"resize_size": [256], "crop_size": [224]}) == Preprocess(256, 224)


# -- ONNX files whose data lie elsewhere -------------------------------------------------------------

def _onnx_with_external(folder: Path, location: str) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["images", "w"], ["logits"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4])], initializer=[weight])
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("location,words", [("../secret.bin", "outside the model's folder"),
                                            ("/etc/hostname", "outside the model's folder"),
                                            ("missing.bin", "does not exist"),
                                            ("short.bin", "does not hold")])
def test_onnx_data_outside_the_folder_is_refused(tmp_path, location, words):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (folder / "short.bin").write_bytes(b"1234")
    path = _onnx_with_external(folder, location)
    from visionzoo.runtime.backends import open_runner

    with pytest.raises(CheckpointError, match=words):
        open_runner(path, "onnxruntime")


def test_onnx_link_out_of_the_folder_is_refused_by_predict(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(bytes(16))
    (folder / "data.bin").symlink_to(tmp_path / "secret.bin")  # a link that leaves the folder
    path = _onnx_with_external(folder, "data.bin")
    run = run_limited("predict", sample_image("coffee.png"), "--model", path, "--backend", "onnxruntime",
                      timeout=300)
    assert run.returncode == 1
    lines = one_line_errors(run.stderr)
    assert len(lines) == 1 and "outside the model's folder" in lines[0]
