"""Predict and embed on Ray: the batch predictor (same answers as the local commands from paths,
bytes, pixels or a decoding stage), the resumable output folder, and `--engine ray` on a local Ray
instance (2,000 images equal to `visionzoo embed`, a killed worker losing no image)."""
from __future__ import annotations

import io
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visionzoo
from visionzoo import InputError
from visionzoo.data.preprocess import Preprocess
from visionzoo.tasks import predict as predict_module
from visionzoo.tasks.distributed import BatchPredictor

from .cli_runner import run_cli
from .photos import sample_image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
SRC = Path(__file__).resolve().parents[1] / "src"
BAD = {"text.jpg": b"not a picture", "empty.png": b"", "noise.gif": b"GIF89a" + bytes(range(40))}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small inputs: see conftest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """EfficientNet-Lite0's weights as a bundle that looks at 32 x 32 crops: the real network, cheap."""
    model = visionzoo.create_model("efficientnet_lite0", pretrained=True)
    return visionzoo.save_bundle(model, tmp_path_factory.mktemp("tiny") / "bundle", classes=model.card.classes,
                                 preprocess=Preprocess(40, 32))


def write_images(folder: Path, n: int, *, size: tuple[int, int] = (28, 22), bad: bool = True) -> list[str]:
    """`n` small random PNG and JPEG files (and the `BAD` files); returns the good files' paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    paths = []
    for i in range(n):
        path = folder / f"{i // 500:02d}" / f"img{i:05d}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    if bad:
        for name, data in BAD.items():
            (folder / name).write_bytes(data)
        jpeg = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
        (folder / "cut.jpg").write_bytes(jpeg.getvalue()[:300])
    return paths


def bad_names() -> set[str]:
    return {*BAD, "cut.jpg"}


def rows_of(table) -> dict[str, dict]:
    return {r["path"]: r for r in table.to_pylist()}


# -- the batch predictor, in this process -----------------------------------------------------------

def test_predictor_embeds_as_embed_does_from_paths_bytes_pixels_and_a_decoding_stage(tiny, tmp_path):
    good = write_images(tmp_path / "img", 6)
    paths = sorted(str(p) for p in (tmp_path / "img").rglob("*") if p.is_file())
    expected = visionzoo.embed(tmp_path / "img", tiny, num_workers=0)
    reference = dict(zip(expected.paths, expected.vectors, strict=True))
    assert sorted(reference) == sorted(good)

    predictor = pickle.loads(pickle.dumps(BatchPredictor(tiny, embed=True)))  # a copy loads its own model
    path_column = np.asarray(paths, dtype=object)
    batches = {
        "paths": {"path": path_column},
        "bytes": {"path": path_column, "bytes": np.asarray([Path(p).read_bytes() for p in paths], dtype=object)},
        "decoded": predictor.decoder()({"path": path_column}),
    }
    for how, batch in batches.items():
        table = predictor(batch)
        assert table.schema == predictor.schema and table.num_rows == len(paths), how
        rows = rows_of(table)
        for p in paths:
            if p in reference:
                assert rows[p]["error"] is None
                np.testing.assert_allclose(rows[p]["embedding"], reference[p], rtol=1e-5, atol=1e-5, err_msg=how)
            else:
                assert rows[p]["embedding"] is None and rows[p]["error"], how
        assert {Path(p).name for p in paths if rows[p]["error"]} == bad_names()

    # decoded pixels (read_images' column) of the PNGs, which carry no orientation: the same vectors
    pngs = [p for p in good if p.endswith(".png")]
    pixels = np.empty(len(pngs), dtype=object)
    pixels[:] = [np.asarray(Image.open(p)) for p in pngs]
    rows = rows_of(predictor({"path": np.asarray(pngs, dtype=object), "image": pixels}))
    for p in pngs:
        np.testing.assert_allclose(rows[p]["embedding"], reference[p], rtol=1e-5, atol=1e-5)


def test_predictor_classifies_as_predict_does_with_the_fast_path_and_its_near_ties(tiny, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("rocket.jpg", "grace_hopper.jpg", "chelsea.png"):  # the JPEGs are large: the fast path
        (folder / name).write_bytes(sample_image(name).read_bytes())
    (folder / "bad.jpg").write_text("no")
    paths = sorted(str(p) for p in folder.iterdir())
    monkeypatch.setattr(predict_module, "NEAR_TIE", 1.0)  # every reduced decode is redone at full size
    predictor = BatchPredictor(tiny, topk=3)
    decoded = predictor.decoder()({"path": np.asarray(paths, dtype=object),
                                   "bytes": np.asarray([Path(p).read_bytes() for p in paths], dtype=object)})
    assert decoded["reduced"].tolist() == [False, False, True, True]  # bad, chelsea.png, grace_hopper, rocket
    for p in visionzoo.predict(paths, tiny, topk=3, num_workers=0, fast=False):  # the exact path's answers
        for batch in ({"path": np.asarray(paths, dtype=object)}, decoded):
            row = rows_of(predictor(batch))[p.path]
            if not hasattr(p, "top"):
                assert row["error"] == p.reason and row["labels"] is None
                continue
            assert row["label"] == p.label and row["labels"] == [t.label for t in p.top]
            assert row["indices"] == [t.index for t in p.top]
            np.testing.assert_allclose(row["probabilities"], [t.probability for t in p.top], atol=1e-5)


def test_predictor_refuses_bad_batches_and_options(tiny):
    predictor = BatchPredictor(tiny, embed=True)
    with pytest.raises(InputError, match="'path' column"):
        predictor({"bytes": np.asarray([b"x"], dtype=object)})
    with pytest.raises(InputError, match="embed=True"):
        BatchPredictor(tiny, normalize=True)
    table = predictor(pa.table({"path": ["/no/such.png"]}))  # a pyarrow table is a batch too
    assert table.column("error").to_pylist() == ["no such file"]


def test_engine_ray_without_ray_names_the_extra(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    code, _, err = run_cli(capsys, "embed", tmp_path, "--engine", "ray", "--out", tmp_path / "o.parquet")
    assert code == 1 and 'pip install "visionzoo[ray]"' in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "predict", tmp_path, "--out", tmp_path / "o.parquet")
    assert code == 1 and "--engine ray" in err


def test_output_folder_resumes_only_its_own_rows_and_drops_cut_files(tmp_path, caplog):
    from visionzoo.tasks.ray_engine import OutputFolder

    out = tmp_path / "out.parquet"
    folder = OutputFolder(str(out))
    assert folder.prepare({"model": "a"}, restart=False) == set()
    pq.write_table(pa.table({"path": ["/x/1.png", "/x/2.png"], "error": [None, "bad"]}), out / "part-1.parquet")
    pq.write_table(pa.table({"path": ["/x/2.png"], "error": ["bad"]}), out / "part-2.parquet")  # a retried task
    (out / "part-3.parquet").write_bytes(b"PAR1 cut short")
    assert OutputFolder(str(out)).prepare({"model": "a"}, restart=False) == {"/x/1.png", "/x/2.png"}
    assert not (out / "part-3.parquet").exists() and "unreadable" in caplog.text
    with pytest.raises(InputError, match="another model or options"):
        OutputFolder(str(out)).prepare({"model": "b"}, restart=False)
    assert OutputFolder(str(out)).prepare({"model": "b"}, restart=True) == set()
    with pytest.raises(InputError, match="is a file"):
        OutputFolder(str(out / "_visionzoo.json"))


# -- on a local Ray instance --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """A local Ray instance whose workers run as the tests do: this checkout's visionzoo, a private
    weights cache, and `auto` without measuring (torch float32). The module-scoped fixture starts
    before the per-test environment (conftest) is set, and Ray's workers only see the variables
    passed here: without them each worker measured its own backend (on the user's cache), and its
    choice differed from the local torch embed in 43 of 2.56M values by up to 1.6e-5."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "VISIONZOO_AUTOTUNE": "0", "TORCH_HOME": str(tmp_path_factory.mktemp("ray_torch_home"))}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_embeds_2000_images_as_embed_does_and_a_rerun_fills_in_missing_rows(ray_instance, tiny, tmp_path, capsys):
    folder = tmp_path / "images"
    write_images(folder, 2000)
    out = tmp_path / "emb.parquet"
    args = ["embed", folder, "--model", tiny, "--engine", "ray", "--out", out, "--threads", "1", "--no-progress"]
    code, _, err = run_cli(capsys, *args)
    assert code == 3, err  # partial: the bad files
    local = visionzoo.embed(folder, tiny, num_workers=1, threads=1)  # as the Ray job: --threads 1
    assert len(local.paths) == 2000 and {Path(f.path).name for f in local.failures} == bad_names()

    def check() -> None:
        table = pq.read_table(out)
        assert table.num_rows == 2004 and len(set(table.column("path").to_pylist())) == 2004
        rows = rows_of(table)
        got = np.stack([np.asarray(rows[p]["embedding"], np.float32) for p in local.paths])
        np.testing.assert_allclose(got, local.vectors, rtol=1e-5, atol=1e-5)
        assert {Path(p).name: r["error"] for p, r in rows.items() if r["error"]} == {
            Path(f.path).name: f.reason for f in local.failures}

    check()
    # a rerun has nothing to do: no Ray job at all
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and "wrote 0 rows" in err and "2004 in all" in err
    # the rows of a lost file are filled in, and only those; the folder given as a URI, read by Ray's reader
    files = sorted(out.glob("*.parquet"))
    lost = pq.read_table(files[0]).num_rows
    files[0].unlink()
    args[1] = f"file://{folder}"
    code, _, err = run_cli(capsys, *args)
    assert f"wrote {lost} rows" in err and "2004 in all" in err
    check()


def _descendants_named(prefix: str) -> list[int]:
    """Processes below this one whose command line starts with `prefix` (Ray names its workers so)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found = []
    for pid in parents:
        p, seen = pid, 0
        while p in parents and p != os.getpid() and seen < 50:
            p, seen = parents[p], seen + 1
        if p == os.getpid():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(prefix.encode()):
                    found.append(pid)
            except OSError:
                pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds Ray's worker processes in /proc")
def test_killing_a_worker_mid_run_loses_no_image(ray_instance, tmp_path):
    from visionzoo.tasks.ray_engine import run_on_ray

    folder = tmp_path / "images"
    good = write_images(folder, 320, size=(64, 48), bad=False)
    out = tmp_path / "labels.parquet"
    outcome: dict = {}

    def job() -> None:
        try:  # full-size inputs (224 x 224), small blocks: a run long enough to be cut
            outcome["run"] = run_on_ray([folder], "efficientnet_lite0", out=out, workers=1, block_rows=16,
                                        batch_size=8, threads=1)
        except Exception as e:  # noqa: BLE001 - the test decides whether a rerun must finish the job
            outcome["error"] = e

    thread = threading.Thread(target=job)
    thread.start()
    killed = None
    deadline = time.monotonic() + 900
    while thread.is_alive() and time.monotonic() < deadline and killed is None:
        actors = _descendants_named("ray::MapWorker(MapBatches(BatchPredictor))")
        if actors and out.is_dir() and any(out.glob("*.parquet")):
            killed = actors[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=900)
    assert killed is not None, "the job ended before a worker could be killed"
    print("the job", "failed: rerun" if "error" in outcome else "finished: Ray retried")
    if "error" in outcome:  # Ray gave up: a rerun fills in exactly the missing rows
        before = {r["path"] for r in pq.read_table(out).to_pylist()} if any(out.glob("*.parquet")) else set()
        run = run_on_ray([folder], "efficientnet_lite0", out=out, workers=1, batch_size=8, threads=1)
        assert run.resumed == len(before) and run.added == len(good) - len(before)
    table = pq.read_table(out)
    assert sorted(table.column("path").to_pylist()) == sorted(good)  # every image, once
    assert table.column("error").null_count == len(good)
