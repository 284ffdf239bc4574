"""`python -m research weights get NAME`: ImageNet weights into the caches the offline path reads, with torch hub's
digest check. Every download here is from a small file served on 127.0.0.1, never the internet."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from research import weights
from research.cli import main
from research.errors import ConfigError
from research.pretrained import verified_cache_file


@pytest.fixture
def served(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (the test puts files in it) and the server's URL."""
    root = tmp_path / "served"
    root.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def small_weights(tmp_path: Path) -> tuple[bytes, str]:
    """A real (small) state dict file's bytes and the torch hub name its sha256 gives it."""
    path = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.arange(12.0).view(3, 4)}, path)
    data = path.read_bytes()
    return data, f"tiny-{hashlib.sha256(data).hexdigest()[:8]}.pth"


def test_a_file_whose_bytes_match_its_name_lands_where_the_offline_path_reads_it(served, tmp_path):
    root, url = served
    data, name = small_weights(tmp_path)
    (root / name).write_bytes(data)
    cache = tmp_path / "hub" / "checkpoints"
    path = weights.download(f"{url}/{name}", cache / name, progress=False)
    assert path == cache / name and path.read_bytes() == data
    assert verified_cache_file(path).sha256 == hashlib.sha256(data).hexdigest()  # what --pretrained checks
    assert torch.load(path, weights_only=True)["conv.weight"].shape == (3, 4)
    assert weights.download(f"{url}/gone.pth", cache / name, progress=False) == path  # already there: not fetched


def test_a_file_that_is_not_what_its_name_promises_is_refused_and_not_kept(served, tmp_path):
    root, url = served
    data, name = small_weights(tmp_path)
    (root / name).write_bytes(data + b"tampered")
    cache = tmp_path / "hub" / "checkpoints"
    with pytest.raises(ConfigError, match="invalid hash value.*not kept"):
        weights.download(f"{url}/{name}", cache / name, progress=False)
    assert not cache.exists() or not any(cache.iterdir())


def test_the_command_fetches_into_torch_home_and_refuses_a_bad_file(served, tmp_path, monkeypatch, capsys):
    """End to end through the CLI: resnet18's torchvision file name, served from a mirror on 127.0.0.1 with bytes
    that are not the real weights: refused in one line, nothing left in $TORCH_HOME."""
    root, url = served
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    src = weights.source("resnet18")
    assert src.dest == tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(src.url)
    (root / src.dest.name).write_bytes(b"not resnet18")
    assert main(["weights", "get", "resnet18", "--mirror", url]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {url}/{src.dest.name}: invalid hash value"), errors
    assert not src.dest.exists()


def test_each_model_name_maps_to_the_file_the_offline_path_looks_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert weights.source("vgg16_v2").dest == checkpoints / "vgg16-397923af.pth"  # the seed's trunk: VGG16's weights
    assert weights.source("vgg16_bn_v2").dest.name.startswith("vgg16_bn-")
    lite = weights.source("efficientnet_lite0")
    assert lite.dest == checkpoints / "tf_efficientnet_lite0-0aa007d2.pth"
    from research.pretrained import timm_cached_file

    lite.dest.parent.mkdir(parents=True)
    lite.dest.write_bytes(b"x")
    assert timm_cached_file("tf_efficientnet_lite0") == str(lite.dest)  # where the offline path reads it
    with pytest.raises(ConfigError, match="Choose one of: vgg16"):
        weights.source("vgg17")
