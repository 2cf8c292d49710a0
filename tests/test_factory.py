"""create_model: weights from the registry, packages, local files; errors that say what is wrong."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

import visionzoo
from visionzoo.errors import CheckpointError, InputError, WeightsUnavailableError
from visionzoo.weights.hub import cache_dir


def _same_outputs(a, b, size=64) -> bool:
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        return torch.allclose(a(x), b(x))


def test_pretrained_default_is_ready_to_use():
    model = visionzoo.create_model("efficientnet_lite0", pretrained=True)
    assert not model.training
    assert model.pretrained_weights.name == "efficientnet_lite0.IMAGENET1K_V1"
    assert model.categories[967] == "espresso"
    assert model.preprocess.crop_size == 224
    again = visionzoo.create_model("efficientnet_lite0.IMAGENET1K_V1")
    assert _same_outputs(model, again)
    assert _same_outputs(model, visionzoo.create_model("efficientnet_lite0", weights="DEFAULT"))
    assert _same_outputs(model, visionzoo.create_model("efficientnet_lite0", weights=model.pretrained_weights))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dict_round_trip_through_a_local_file(tmp_path, suffix):
    from visionzoo.weights.io import save_state_dict

    torch.manual_seed(0)
    original = visionzoo.create_model("resnet18", num_classes=5)
    path = save_state_dict(original.state_dict(), tmp_path / f"resnet18{suffix}")
    loaded = visionzoo.create_model("resnet18", weights=path)  # head size read from the file
    assert loaded.num_classes == 5 and loaded.weights_source == str(path)
    assert _same_outputs(original, loaded)
    assert _same_outputs(original, visionzoo.create_model("resnet18", weights=str(path)))


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(visionzoo.create_model("resnet18").state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        visionzoo.create_model("resnet34", weights=path)
    msg = str(e.value)
    assert "does not fit resnet34" in msg and "missing (layer1.2" in msg and str(path) in msg
    assert "\n" not in msg
    with pytest.raises(CheckpointError, match="unexpected"):
        visionzoo.create_model("mobilenet_v2", weights=path)


def test_num_classes_replaces_the_head_after_loading():
    model = visionzoo.create_model("efficientnet_lite0", pretrained=True, num_classes=7)
    assert model.num_classes == 7 and model.categories is None
    assert model.classifier[1].in_features == model.num_features
    base = visionzoo.create_model("efficientnet_lite0", pretrained=True)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():  # the backbone kept the pretrained weights
        assert torch.allclose(model.forward_features(x), base.forward_features(x))


def test_conflicting_or_bad_arguments():
    with pytest.raises(InputError, match="already names weights"):
        visionzoo.create_model("efficientnet_lite0.IMAGENET1K_V1", weights="IMAGENET1K_V1")
    with pytest.raises(InputError):
        visionzoo.create_model("resnet18", num_classes=-3)
    with pytest.raises(CheckpointError, match="not found"):
        visionzoo.create_model("resnet18", weights="/nonexistent/file.pth")


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Evil()}, path)
    with pytest.raises(CheckpointError, match="run code"):
        visionzoo.create_model("resnet18", weights=path)
    assert not marker.exists()


def test_garbage_and_empty_files_are_reported(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="empty"):
        visionzoo.create_model("resnet18", weights=tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="cannot be read"):
        visionzoo.create_model("resnet18", weights=tmp_path / "junk.pth")


@pytest.fixture
def http_server():
    """A loopback HTTP server serving `files` (name -> bytes)."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield files, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_and_caches(http_server, tmp_path):
    files, base = http_server
    torch.manual_seed(0)
    source = visionzoo.create_model("squeezenet1_1")
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    body = path.read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    files["squeezenet1_1-test.pth"] = body
    record = dataclasses.replace(visionzoo.get_weights("squeezenet1_1"), url=f"{base}/squeezenet1_1-test.pth",
                                 file_name=f"squeezenet1_1-{digest[:8]}.pth", sha256_prefix=digest[:8])
    model = visionzoo.create_model("squeezenet1_1", weights=record)
    assert (cache_dir() / record.file_name).is_file()
    assert _same_outputs(model, source)

    bad = dataclasses.replace(record, file_name="squeezenet1_1-deadbeef.pth", sha256_prefix="deadbeef")
    with pytest.raises(WeightsUnavailableError, match="expected deadbeef"):
        visionzoo.create_model("squeezenet1_1", weights=bad)
    assert not (cache_dir() / bad.file_name).exists()
    assert not list(cache_dir().glob("*.part"))
