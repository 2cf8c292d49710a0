"""Embeddings: API and CLI, .npy + sidecar and Parquet output, layers, resuming after a kill,
and a nearest-neighbour sanity check on real photos."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import visionzoo
from visionzoo import InputError
from visionzoo.data import load_image
from visionzoo.models.features import FeatureExtractor
from visionzoo.tasks.embed import read_embeddings, read_paths, sidecar_path

from .photos import sample_image

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "grace_hopper.jpg",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "coins.png", "brick.png"]
SRC = Path(__file__).resolve().parents[1] / "src"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


@pytest.fixture(scope="module")
def model():
    return visionzoo.create_model("efficientnet_lite0", pretrained=True)


@pytest.fixture
def few(tmp_path):
    """Three photos and a bad file."""
    folder = tmp_path / "few"
    folder.mkdir()
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        (folder / name).write_bytes(sample_image(name).read_bytes())
    (folder / "bad.jpg").write_text("not a picture")
    return folder


def test_embed_npy_with_sidecar(model, few, tmp_path):
    out = tmp_path / "out" / "emb.npy"
    result = visionzoo.embed([few, tmp_path / "missing.png"], model, out=out, num_workers=0)
    names = [Path(p).name for p in result.paths]
    assert names == ["chelsea.png", "coffee.png", "rocket.jpg"] and result.dim == 1280
    assert sorted((Path(f.path).name, f.reason.split(" (")[0]) for f in result.failures) == [
        ("bad.jpg", "not an image"), ("missing.png", "no such file or directory; check the path")]
    vectors = np.load(out)
    assert vectors.shape == (3, 1280) and vectors.dtype == np.float32
    assert read_paths(sidecar_path(out)) == result.paths
    assert np.array_equal(result.vectors, vectors)
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.npy", "emb.paths.jsonl"]  # work folder removed

    # the vectors are the pooled pre-logits of the preprocessed images
    x = torch.stack([model.preprocess.transforms()(load_image(p)) for p in result.paths])
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    assert np.allclose(vectors, expected, atol=1e-4)
    # in memory (no out) the same
    assert np.array_equal(visionzoo.embed(few, model, num_workers=0).vectors, vectors)


def test_layer_and_normalize(model, few):
    result = visionzoo.embed(few, model, layer="-2", normalize=True, num_workers=0)
    info = model.feature_info[-2]
    assert result.layer == info.module and result.vectors.shape == (3, info.num_chs)
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1, atol=1e-5)
    extractor = FeatureExtractor(model, (-2,))
    x = torch.stack([model.preprocess.transforms()(load_image(p)) for p in result.paths])
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(extractor(x)[0].mean(dim=(2, 3)), dim=1).numpy()
    assert np.allclose(result.vectors, pooled, atol=1e-5)
    with pytest.raises(InputError, match="no stage 'head'"):
        visionzoo.embed(few, model, layer="head")


def test_parquet_is_readable_by_pyarrow_and_pandas(model, few, tmp_path):
    pa_parquet = pytest.importorskip("pyarrow.parquet", reason="pyarrow is in the test extra")
    pd = pytest.importorskip("pandas", reason="pandas is in the test extra")
    out = tmp_path / "emb.parquet"
    result = visionzoo.embed(few, model, out=out, num_workers=0)
    table = pa_parquet.read_table(out)
    assert table.column_names == ["path", "embedding"] and table.num_rows == 3
    assert table.schema.field("embedding").type.list_size == 1280
    assert json.loads(table.schema.metadata[b"visionzoo"])["model"] == "efficientnet_lite0"
    frame = pd.read_parquet(out)
    assert list(frame["path"]) == result.paths
    reference = visionzoo.embed(few, model, num_workers=0).vectors
    assert np.array_equal(np.stack(frame["embedding"].to_numpy()).astype(np.float32), reference)
    paths, vectors = read_embeddings(out)
    assert paths == result.paths and np.array_equal(vectors, reference)


def test_bad_arguments_fail_before_any_work(model, few, tmp_path):
    with pytest.raises(InputError, match="name the file .npy or .parquet"):
        visionzoo.embed(few, model, out=tmp_path / "emb.csv")
    with pytest.raises(InputError, match="multiple of batch_size"):
        visionzoo.embed(few, model, out=tmp_path / "emb.npy", batch_size=4, chunk_size=6)
    assert not list(tmp_path.glob("*.npy"))


@pytest.mark.slow  # two embedding runs (48 s on a loaded machine)
def test_changed_options_discard_partial_results(model, few, tmp_path):
    out = tmp_path / "emb.npy"
    work = tmp_path / ".emb.npy.embed-work"
    work.mkdir()
    (work / "key.json").write_text(json.dumps({"digest": "from another run"}))
    np.savez(work / "chunk-000000.npz", indices=np.array([0]), vectors=np.zeros((1, 1280), np.float32),
             failed=np.array([], np.int64), reasons=np.array([], str))
    result = visionzoo.embed(few, model, out=out, num_workers=0)
    assert len(result) == 3 and np.abs(np.load(out)).sum() > 0 and not work.exists()


def _embed_cli(folder: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "visionzoo", "embed", str(folder), "--out", str(out),
                             "--batch-size", "8", "--chunk-size", "16", "--workers", "0", "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _many_images(folder: Path, count: int) -> None:
    """`count` small, distinct JPEGs (crops of real photos), two of them broken."""
    folder.mkdir()
    photos = [Image.open(sample_image(n)).convert("RGB") for n in PHOTOS[:6]]
    for i in range(count):
        img = photos[i % len(photos)]
        x, y = (i * 37) % (img.width - 96), (i * 23) % (img.height - 96)
        img.crop((x, y, x + 96, y + 96)).save(folder / f"img{i:04d}.jpg", quality=90)
    (folder / "img0003.jpg").write_text("overwritten by a text file")  # in the first chunk
    (folder / "img0190.jpg").write_bytes(b"")  # in the last chunk


@pytest.mark.slow  # 20 s quiet
def test_killed_run_resumes_to_the_same_file(tmp_path):
    folder = tmp_path / "images"
    _many_images(folder, 200)  # 13 chunks of 16
    full = tmp_path / "full" / "emb.npy"
    proc = _embed_cli(folder, full)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err  # partial: two bad files
    assert "198 embedded, 2 failed" in err

    resumed = tmp_path / "resumed" / "emb.npy"
    work = resumed.parent / ".emb.npy.embed-work"
    proc = _embed_cli(folder, resumed)
    deadline = time.monotonic() + 300
    while len(list(work.glob("chunk-*.npz"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)  # no clean-up runs: what a crash or a power cut leaves
    proc.wait(timeout=60)
    saved = len(list(work.glob("chunk-*.npz")))
    assert 3 <= saved < 13 and not resumed.exists()

    proc = _embed_cli(folder, resumed)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err
    assert f"resuming: {saved} of 13 chunks" in err
    assert "img0003.jpg" in err and "img0190.jpg" in err  # failures of saved chunks still reported
    assert resumed.read_bytes() == full.read_bytes()
    assert sidecar_path(resumed).read_text() == sidecar_path(full).read_text()
    assert len(sidecar_path(full).read_text().splitlines()) == 198
    assert not work.exists()


def _augmented(img: Image.Image) -> dict[str, Image.Image]:
    w, h = img.size
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=30)
    return {"flip": ImageOps.mirror(img),
            "crop": img.crop((int(w * 0.08), int(h * 0.05), int(w * 0.96), int(h * 0.97))),
            "jpeg30": Image.open(io.BytesIO(buf.getvalue())).convert("RGB")}


def test_augmented_copies_retrieve_their_original(model, tmp_path):
    copies = tmp_path / "copies"
    copies.mkdir()
    for name in PHOTOS:
        img = Image.open(sample_image(name)).convert("RGB")
        for kind, aug in _augmented(img).items():
            aug.save(copies / f"{Path(name).stem}.{kind}.png", compress_level=1)
    base = visionzoo.embed([sample_image(name) for name in PHOTOS], model, normalize=True, num_workers=0)
    query = visionzoo.embed(copies, model, normalize=True, num_workers=0)
    assert len(base) == len(PHOTOS) and len(query) == 3 * len(PHOTOS)
    nearest = (query.vectors @ base.vectors.T).argmax(axis=1)
    wrong = [(Path(q).name, Path(base.paths[j]).name) for q, j in zip(query.paths, nearest, strict=True)
             if Path(q).name.split(".")[0] != Path(base.paths[j]).stem]
    assert not wrong, wrong


# -- hostile names and concurrent runs (issue 13) ----------------------------------------------------

def test_any_file_name_survives_the_sidecar(model, tmp_path):
    """A newline or U+2028 in a name used to shift every row after it; a name that is not UTF-8
    stopped the whole run. Now every name comes back exactly, in row order."""
    folder = tmp_path / "odd"
    folder.mkdir()
    photo = sample_image("coffee.png").read_bytes()
    names = ["new\nline.png", "sep\u2028arator.png", os.fsdecode(b"latin1-\xe9t\xe9.png"), "plain.png",
             '"quoted", \\back.png']
    for i, name in enumerate(names):
        img = Image.open(io.BytesIO(photo)).convert("RGB").rotate(30 * i)  # distinct vectors
        img.save(folder / name)
    out = tmp_path / "emb.npy"
    result = visionzoo.embed(folder, model, out=out, num_workers=0)
    assert not result.failures and len(result) == len(names)
    paths, vectors = read_embeddings(out)
    assert paths == result.paths and sorted(Path(p).name for p in paths) == sorted(names)
    assert sidecar_path(out).read_bytes().isascii() and len(sidecar_path(out).read_bytes().splitlines()) == len(names)
    assert os.fsencode(next(p for p in paths if "latin1" in p)).endswith(b"latin1-\xe9t\xe9.png")
    single = {p: visionzoo.embed([p], model, num_workers=0).vectors[0] for p in paths}
    for p, v in zip(paths, vectors, strict=True):
        assert np.allclose(v, single[p], atol=1e-4), p  # each row is its own file's vector

    pytest.importorskip("pyarrow")
    parquet = visionzoo.embed(folder, model, out=tmp_path / "emb.parquet", num_workers=0)
    assert [Path(f.path).name for f in parquet.failures] == [os.fsdecode(b"latin1-\xe9t\xe9.png")]
    assert "not valid UTF-8" in parquet.failures[0].reason and len(parquet) == len(names) - 1


def test_old_sidecars_are_still_read(tmp_path):
    out = tmp_path / "old.npy"
    np.save(out, np.eye(2, dtype=np.float32))
    (tmp_path / "old.paths.txt").write_text("a.png\nb.png\n")
    paths, vectors = read_embeddings(out)
    assert paths == ["a.png", "b.png"] and vectors.shape == (2, 2)


@pytest.mark.slow  # 11 s quiet
def test_a_second_run_on_the_same_output_is_refused_and_the_first_is_intact(tmp_path):
    """The issue's `embed many -o o.npy & embed many -o o.npy --normalize`: the first wrote 640
    rows of which 544 were the second's. Now the second stops at once, naming the first."""
    folder = tmp_path / "images"
    _many_images(folder, 120)
    out = tmp_path / "o.npy"
    first = _embed_cli(folder, out)
    work = tmp_path / ".o.npy.embed-work"
    deadline = time.monotonic() + 300
    while not list(work.glob("chunk-*.npz")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second started"
    second = subprocess.run([sys.executable, "-m", "visionzoo", "embed", str(folder), "--out", str(out),
                             "--normalize", "--workers", "0"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert second.returncode == 1 and "Traceback" not in second.stderr
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "embed" in lines[0] and "--wait" in lines[0]
    _, err = first.communicate(timeout=600)
    assert first.returncode == 3, err  # img0003.jpg is broken
    paths, vectors = read_embeddings(out)
    assert len(paths) == len(vectors) == 119
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)  # its own vectors, not normalised ones
    assert not work.exists() and not (tmp_path / ".o.npy.lock").exists()
