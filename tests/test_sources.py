"""The npm styles' sources: pinned tarballs, digest-checked, cached; a missing or refused source is one line.

The real tarballs come from the shared cache (tests/conftest.py: $RESEARCH_SOURCES_DIR, filled with `npm pack` by
the first build); the failures are made with an empty cache and a PATH without npm, or with a stand-in `npm`
program that writes other bytes than the pinned ones (what a registry serving a changed package would do).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from research.data import sources
from research.data.emoji import STYLES, build_dataset
from research.errors import ConfigError
from tests.conftest import needs_npm_styles
from tests.reliability import cli_env, research_cmd

FLAT = STYLES["fluent-flat"].npm


def cached_tarball() -> Path:
    return sources.fetch(FLAT)  # the shared cache: fetched once per machine


@needs_npm_styles
def test_a_pinned_tarball_is_read_from_the_cache_without_npm(tmp_path, monkeypatch):
    cache = tmp_path / "sources"
    cache.mkdir()
    shutil.copy(cached_tarball(), cache / FLAT.tarball)
    monkeypatch.setenv("PATH", str(tmp_path / "no-npm-here"))
    assert sources.fetch(FLAT, cache) == cache / FLAT.tarball
    icons = sources.icon_set(str(cache / FLAT.tarball))
    assert icons.find("1F415", "dog") and icons.find("2764-FE0F", "red heart")  # with and without FE0F


def test_without_npm_and_without_the_tarball_the_build_is_one_error_line(tmp_path):
    """`data build` on a machine without npm: exit 2, one line naming the package and the fixes, nothing written."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = cli_env(PATH=str(bin_dir), RESEARCH_SOURCES_DIR=str(tmp_path / "empty"))
    out = subprocess.run(research_cmd("data", "build", "--out", "raw/emoji20", "--classes", "heart",
                                      "--limit-per-class", "1"), cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert "@iconify-json/fluent-emoji-flat@1.2.6" in lines[0] and "npm" in lines[0] and "--styles" in lines[0]
    assert not [p for p in (tmp_path / "raw").rglob("*")]  # (its parent folder may be there, empty)
    # the three PyPI styles build without npm: another dataset, asked for by name
    out = subprocess.run(research_cmd("data", "build", "--out", "raw/emoji20", "--classes", "heart",
                                      "--limit-per-class", "1", "--styles", "openmoji", "twemoji", "noto"),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert {p.name.split("_")[0] for p in (tmp_path / "raw/emoji20/heart").glob("*.png")} == {
        "openmoji", "twemoji", "noto", "photo"}


def fake_npm(folder: Path, payload: bytes) -> None:
    """An `npm` that answers `npm pack SPEC --pack-destination DIR ...` by writing `payload` as the tarball."""
    folder.mkdir()
    script = folder / "npm"
    script.write_text(f"""#!{sys.executable}
import sys, pathlib
args = sys.argv[1:]
dest = pathlib.Path(args[args.index("--pack-destination") + 1])
name, version = args[1].rsplit("@", 1)
(dest / (name.lstrip("@").replace("/", "-") + "-" + version + ".tgz")).write_bytes({payload!r})
""")
    script.chmod(0o755)


def test_a_tarball_with_another_digest_is_refused_and_not_kept(tmp_path, monkeypatch):
    cache = tmp_path / "sources"
    fake_npm(tmp_path / "bin", b"not the package")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    refused = f"{FLAT.spec}: the fetched tarball's sha256 is .* not the pinned {FLAT.sha256}"
    with pytest.raises(ConfigError, match=refused):
        sources.fetch(FLAT, cache)
    assert not (cache / FLAT.tarball).exists() and not list(cache.glob(".fetch-*"))


@needs_npm_styles
def test_a_damaged_cached_tarball_is_fetched_again(tmp_path, monkeypatch):
    """A cut download in the cache is not used: npm fetches the package again, and the digest decides."""
    cache = tmp_path / "sources"
    cache.mkdir()
    good = cached_tarball().read_bytes()
    (cache / FLAT.tarball).write_bytes(good[: len(good) // 2])
    fake_npm(tmp_path / "bin", good)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert sources.fetch(FLAT, cache).read_bytes() == good


def test_the_cache_is_never_a_folder_of_someone_else(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="never written"):
        sources.fetch(FLAT, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_build_never_silently_drops_a_style(tmp_path, monkeypatch):
    """No npm and no cache: the default build stops before writing anything; it never builds fewer styles."""
    monkeypatch.setenv("PATH", str(tmp_path / "no-npm-here"))
    monkeypatch.setenv("RESEARCH_SOURCES_DIR", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="needs npm"):
        build_dataset(tmp_path / "raw", classes=["heart"], limit_per_class=1, progress=False, workers=1)
    assert not (tmp_path / "raw").exists() and not (tmp_path / "raw.partial").exists()
    assert not list(tmp_path.glob(".raw*"))  # no lock left beside it either
