"""Stages never write into a source and never over another stage's output (research/data/outputs.py).

Each test runs the real commands (`research.cli.main`, or a real `python -m research split` killed
with SIGKILL) in a project laid out as the README's: data/raw/emoji20 (a class-per-folder tree of
real PNGs), data/clean/emoji20 (the clean stage's contract), data/versions/v3 (built by `split`).
A refusal is exit code 2 with one `error:` line, and the refused target is byte-identical after it.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from research.cli import main
from research.data.outputs import MARKER, stage_of
from research.data.scan import scan
from research.data.split import build_version
from research.data.versions import load_version
from research.errors import ConfigError
from tests.conftest import write_clean_dir
from tests.reliability import cli_env, kill, research_cmd, tree_fingerprint

CLASSES = {"circles", "squares", "stripes"}


@pytest.fixture
def project(tmp_path, make_tree, monkeypatch) -> Path:
    """The README's layout under tmp_path, which is also the working directory."""
    monkeypatch.chdir(tmp_path)
    raw = make_tree({"circles": ("circle", 10), "squares": ("square", 8), "stripes": ("stripe", 6)},
                    name="data/raw/emoji20")
    clean = write_clean_dir(raw, tmp_path / "data/clean/emoji20")
    build_version(clean, "v3", recipe="v1", out_root="data/versions", progress=False, workers=1)
    return tmp_path


def refused(argv: list[str], capsys) -> str:
    """Run one command; it must exit 2 with an `error:` line, which is returned."""
    capsys.readouterr()  # what earlier commands printed
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: "), (argv, code, err)
    return err


def classes_of(tree: Path) -> set[str]:
    return set(scan(tree, workers=1, progress=False)["class"]) - {""}


def test_a_version_name_is_a_plain_name(project, capsys):
    """The issue's `--version ../raw/emoji20 --force` replaced the source; other spellings of a path too."""
    before = {p: tree_fingerprint(project / p) for p in ("data/raw", "data/clean", "data/versions")}
    names = ["../raw/emoji20", "../../data/raw/emoji20", "..", ".", "v3/../../raw/emoji20", "a/b",
             str(project / "elsewhere"), ".hidden", "", "v 3", "v3/"]
    for name in names:
        for force in ([], ["--force"]):
            err = refused(["split", "data/clean/emoji20", "--version", name, *force], capsys)
            assert "is not a plain name" in err and "--force" not in err, (name, err)
    assert {p: tree_fingerprint(project / p) for p in before} == before
    assert not (project / "elsewhere").exists()


def test_split_never_writes_into_or_over_a_source(project, capsys):
    """The issue's `--version v9 --out data/raw/emoji20` made a class v9; the same place by other paths."""
    os.symlink("raw/emoji20", project / "data/link")
    raw, clean = project / "data/raw/emoji20", project / "data/clean/emoji20"
    before = tree_fingerprint(raw), tree_fingerprint(clean)
    attempts = [
        ("v9", "data/raw/emoji20", "inside the source"),
        ("v9", "data/raw/emoji20/circles", "inside the source"),  # a class folder
        ("v9", "data/link", "inside the source"),  # the source through a symlink
        ("v9", "data/raw/../raw/./emoji20", "inside the source"),
        ("emoji20", "data/raw", "inside the source"),  # the source itself, with --force
        ("v9", "data/clean/emoji20", "inside the source"),  # the clean dir is a source of split too
        ("emoji20", "data/clean", "inside the source"),
        ("data", ".", "contains the source"),  # --force would have renamed data/ away and deleted it
        ("raw", "data", "contains the source"),
    ]
    for name, out, why in attempts:
        err = refused(["split", "data/clean/emoji20", "--version", name, "--out", out, "--force"], capsys)
        assert why in err and "--force" not in err, (name, out, err)
    assert (tree_fingerprint(raw), tree_fingerprint(clean)) == before
    assert classes_of(raw) == CLASSES
    assert sorted(p.name for p in (project / "data/versions").iterdir()) == ["v3"]  # no temp left either


def test_eda_scan_clean_and_build_never_write_into_a_source(project, capsys, make_tree):
    """The issue's `eda T --out "T/eda report"` and `data scan T --out T/inventory.csv`, and their neighbours."""
    os.symlink("raw/emoji20", project / "data/link")
    other = make_tree({"cats": ("circle", 3), "dogs": ("square", 3)}, name="data/raw/mine")  # a source of its own
    raw = project / "data/raw/emoji20"
    before = tree_fingerprint(project / "data/raw")
    T = "data/raw/emoji20"
    for out, why in [(f"{T}/eda report", "inside the source"), (T, "inside the source"),
                     (f"{T}/circles", "inside the source"), ("data/link/eda", "inside the source"),
                     ("data/raw", "contains the source"), (".", "contains the source"),
                     ("data/raw/mine", "is a source tree"), ("data/raw/mine/report", "holds images")]:
        for command in (["eda", T, "--no-log"], ["clean", T, "--no-log"]):
            err = refused([*command, "--out", out], capsys)
            assert why in err, (command, out, err)
    for out, why in [(f"{T}/inventory.csv", "inside the source"), (f"{T}/circles/inventory.csv", "inside the source"),
                     ("data/link/inventory.csv", "inside the source"), ("data/raw/mine/inventory.csv", "holds images"),
                     ("data/raw/mine/cats/inventory.csv", "holds images")]:
        err = refused(["data", "scan", T, "--out", out], capsys)
        assert why in err, (out, err)
    for out in (f"{T}/new", "data/raw/mine/new", "data/raw/mine"):
        err = refused(["data", "build", "--out", out, "--classes", "heart", "--limit-per-class", "1"], capsys)
        assert "source" in err or "holds images" in err, (out, err)
    assert tree_fingerprint(project / "data/raw") == before
    assert classes_of(raw) == CLASSES and classes_of(other) == {"cats", "dogs"}


def test_no_stage_overwrites_another_stages_output(project, capsys):
    """The issue's `clean data/raw/emoji20 --out data/versions/v3` broke `train --dataset v3`; every pair of stages."""
    assert main(["eda", "data/raw/emoji20", "--out", "reports/eda/emoji20", "--no-log", "--workers", "1"]) == 0
    folders = {"split": "data/versions/v3", "clean": "data/clean/emoji20", "eda": "reports/eda/emoji20"}
    before = {f: tree_fingerprint(project / f) for f in folders.values()}
    T = "data/raw/emoji20"
    commands = {"eda": ["eda", T, "--no-log", "--out"], "clean": ["clean", T, "--no-log", "--out"]}
    for stage, command in commands.items():
        for owner, folder in folders.items():
            if owner != stage:
                err = refused([*command, folder], capsys)
                assert f"the output of `python -m research {owner}`" in err, (stage, folder, err)
            err = refused([*command, f"{folder}/inside"], capsys)
            assert f"the output of `python -m research {owner}`" in err, (stage, folder, err)
    for owner, folder in folders.items():
        parent, name = folder.rsplit("/", 1)
        if owner != "split":
            err = refused(["split", "data/clean/emoji20", "--version", name, "--out", parent, "--force"], capsys)
            assert "the output of" in err or "inside the source" in err, (folder, err)
        err = refused(["split", "data/clean/emoji20", "--version", "v9", "--out", folder], capsys)
        assert "the output of" in err or "inside the source" in err, (folder, err)
        for file in ("manifest.csv", "new.csv"):
            err = refused(["data", "scan", T, "--out", f"{folder}/{file}"], capsys)
            assert f"the output of `python -m research {owner}`" in err, (folder, err)
        err = refused(["data", "build", "--out", folder, "--classes", "heart", "--limit-per-class", "1"], capsys)
        assert f"the output of `python -m research {owner}`" in err, (folder, err)
    assert {f: tree_fingerprint(project / f) for f in folders.values()} == before
    assert len(load_version("v3").split_frame("train")) > 0  # what `train --dataset v3` reads


def test_scan_replaces_an_inventory_but_no_other_file(project, capsys):
    notes = project / "notes.csv"
    notes.write_text("my,own\nnotes,here\n")
    err = refused(["data", "scan", "data/raw/emoji20", "--out", "notes.csv"], capsys)
    assert "not a previous `python -m research data scan` output" in err
    assert notes.read_text() == "my,own\nnotes,here\n"
    (project / "reports").mkdir()
    assert "is a folder" in refused(["data", "scan", "data/raw/emoji20", "--out", "reports"], capsys)
    for _ in range(2):  # a new inventory, then the same file replaced
        assert main(["data", "scan", "data/raw/emoji20", "--out", "inventory.csv", "--workers", "1"]) == 0
    assert len(pd.read_csv(project / "inventory.csv")) == 24


def test_each_stage_marks_its_folder_and_may_write_it_again(project, capsys):
    for _ in range(2):
        assert main(["eda", "data/raw/emoji20", "--no-log", "--workers", "1"]) == 0
        assert main(["clean", "data/raw/emoji20", "--method", "score", "--no-log", "--workers", "1",
                     "--out", "data/clean/again"]) == 0
    assert "--force" in refused(["split", "data/clean/emoji20", "--version", "v3"], capsys)
    assert main(["split", "data/clean/emoji20", "--version", "v3", "--recipe", "v1", "--force"]) == 0
    for folder, stage in [("reports/eda/emoji20", "eda"), ("data/clean/again", "clean"), ("data/versions/v3", "split")]:
        assert stage_of(project / folder) == stage and (project / folder / MARKER).is_file()
    assert classes_of(project / "data/raw/emoji20") == CLASSES


def test_outputs_made_before_markers_keep_working(project, capsys):
    """A version, clean dir and eda report without a marker are known by their own files."""
    assert main(["eda", "data/raw/emoji20", "--no-log", "--workers", "1"]) == 0
    for folder in ("data/versions/v3", "reports/eda/emoji20"):
        (project / folder / MARKER).unlink(missing_ok=True)
    manifest = (project / "data/versions/v3/manifest.csv").read_bytes()
    err = refused(["clean", "data/raw/emoji20", "--out", "data/versions/v3", "--no-log"], capsys)
    assert "the output of `python -m research split`" in err
    assert (project / "data/versions/v3/manifest.csv").read_bytes() == manifest
    assert "the output of `python -m research clean`" in refused(
        ["eda", "data/raw/emoji20", "--out", "data/clean/emoji20", "--no-log"], capsys)
    assert main(["eda", "data/raw/emoji20", "--no-log", "--workers", "1"]) == 0
    assert main(["split", "data/clean/emoji20", "--version", "v3", "--recipe", "v1", "--force"]) == 0
    assert stage_of(project / "data/versions/v3") == "split" and (project / "data/versions/v3" / MARKER).is_file()


def test_a_version_overwritten_by_another_command_is_a_clear_error(project):
    """What the old `clean --out data/versions/v3` left: `train --dataset v3` died with KeyError: 'split'."""
    v3 = project / "data/versions/v3"
    (v3 / "manifest.csv").write_bytes((project / "data/clean/emoji20/manifest.csv").read_bytes())
    with pytest.raises(ConfigError, match=r"not a dataset version's manifest \(no split column\).*Delete"):
        load_version("v3").split_frame("train")


@pytest.mark.slow
def test_a_killed_split_leaves_no_temp_folder_after_the_next_run(tmp_path, make_tree, monkeypatch):
    """SIGKILL in the middle of a real `python -m research split`; the next split of that version cleans up."""
    monkeypatch.chdir(tmp_path)
    raw = make_tree({"circles": ("circle", 60), "squares": ("square", 60), "stripes": ("stripe", 60)}, size=64,
                    name="data/raw/emoji20")
    write_clean_dir(raw, tmp_path / "data/clean/emoji20")
    versions = tmp_path / "data/versions"
    log = (tmp_path / "split.log").open("w")
    proc = subprocess.Popen(research_cmd("split", "data/clean/emoji20", "--version", "v5", "--recipe", "v1",
                                         "--workers", "1"),
                            cwd=tmp_path, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        temp = None
        while temp is None and proc.poll() is None:
            temp = next((p for p in versions.glob(".v5.tmp-*") if (p / "train").is_dir()), None) \
                if versions.is_dir() else None
            time.sleep(0.002)
    finally:
        kill(proc)
    assert temp is not None and temp.is_dir(), (tmp_path / "split.log").read_text()[-2000:]
    assert not (versions / "v5").exists()
    sleeper = subprocess.Popen(["sleep", "60"])  # a split still running: its temp folder is not touched
    try:
        alive = versions / f".v5.tmp-{sleeper.pid}"
        other = versions / f".v50.tmp-{proc.pid}"  # another version's leftover: not this split's to remove
        for folder in (alive, other):
            folder.mkdir()
        build_version("data/clean/emoji20", "v5", recipe="v1", out_root=versions, progress=False, workers=1)
        assert not temp.exists() and alive.is_dir() and other.is_dir()
        assert sorted(p.name for p in versions.iterdir()) == sorted(["v5", alive.name, other.name])
    finally:
        sleeper.kill()
        sleeper.wait()
