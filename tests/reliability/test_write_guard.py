"""One write guard (research/data/outputs.py): every path a command writes or deletes stays in its own output.

The cases of issue 26 through the real commands (`research.cli.main`): a clean manifest whose `class`
climbs out of the version (`split`), a class folder a user added to a built dataset and a `.partial`
folder that is not the build's (`data build`), a report sent into a source class folder or named by a
study name that is a path (`report`). Each refusal is exit code 2 and one `error:` line, and every
file outside the stage's output is byte-identical afterwards. A property test then feeds the guard
a few hundred random relative, absolute, `..` and symlinked paths.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pandas as pd
import pytest

from research.cli import main
from research.data import outputs
from research.errors import ConfigError
from tests.conftest import write_clean_dir
from tests.reliability import tiny_sweep_spec, tree_fingerprint


def refused(argv: list[str], capsys) -> str:
    """Run one command; it must exit 2 with one `error:` line, which is returned."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: "), (argv, code, err[-2000:])
    return err


def everything_but(root: Path, *inside: str) -> dict[str, tuple]:
    """tree_fingerprint of `root` without the entries under the given relative folders."""
    return {k: v for k, v in tree_fingerprint(root).items()
            if not any(k == p or k.startswith(p + "/") for p in inside)}


@pytest.fixture
def project(tmp_path, make_tree, monkeypatch) -> Path:
    """data/raw/tiny (3 classes of real PNGs) and its clean dir, under tmp_path as the working directory."""
    monkeypatch.chdir(tmp_path)
    raw = make_tree({"heart": ("circle", 8), "drink": ("square", 8), "sky": ("stripe", 8)}, size=32,
                    name="data/raw/tiny")
    write_clean_dir(raw, tmp_path / "data/clean/tiny")
    return tmp_path


# ------------------------------------------------------------------------------ split: names from a CSV

@pytest.mark.parametrize("column, value", [
    ("class", "../../../raw/tiny/heart"),  # the issue's: split wrote its copies among the source's images
    ("class", "../../../raw/tiny"),
    ("class", "/tmp/elsewhere"),
    ("class", "heart/deeper"),
    ("class", ".."),
    ("class", ""),
    ("class", "back\\slash"),
    ("class", "x" * 300),
    ("path", "../tiny/heart/heart_000.png"),  # read from outside the source root
])
def test_split_refuses_a_manifest_name_that_is_not_a_plain_name(project, capsys, column, value):
    manifest = project / "data/clean/tiny/manifest.csv"
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    hearts = df.index[df["class"] == "heart"]
    if column == "class":
        df.loc[hearts, "class"] = value
    else:
        df.loc[hearts[0], "path"] = value
    df.to_csv(manifest, index=False)
    before = everything_but(project, "data/versions", "mlruns")

    err = refused(["split", "data/clean/tiny", "--version", "v1", "--recipe", "v1", "--workers", "1"], capsys)
    assert "not a plain file or folder name" in err or "not a relative path" in err, err
    assert f"{column} in data/clean/tiny/manifest.csv" in err and "ix that row" in err
    assert everything_but(project, "data/versions", "mlruns") == before  # the source and the clean dir are untouched
    versions = project / "data/versions"
    assert not versions.exists() or not any(versions.iterdir())  # no version, no temporary folder


def test_split_writes_every_file_inside_its_temporary_folder(project):
    """A plain manifest still splits, and the version's marker lists exactly the files it holds."""
    from research.data.split import build_version

    target = build_version("data/clean/tiny", "v1", recipe="v1", out_root="data/versions", progress=False, workers=1)
    on_disk = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()} - {outputs.MARKER}
    assert outputs.recorded_files(target, "split") == on_disk
    assert outputs.unknown_files(target, "split") == []


def test_split_force_never_deletes_a_file_it_did_not_write(project, capsys):
    from research.data.split import build_version

    target = build_version("data/clean/tiny", "v1", recipe="v1", out_root="data/versions", progress=False, workers=1)
    notes = target / "train" / "heart" / "my_notes.txt"
    notes.write_text("mine")
    err = refused(["split", "data/clean/tiny", "--version", "v1", "--recipe", "v1", "--force", "--workers", "1"],
                  capsys)
    assert "train/heart/my_notes.txt" in err and "never deletes what it did not write" in err
    assert notes.read_text() == "mine"


# ------------------------------------------------------------------------------ data build

BUILD = ["data", "build", "--classes", "heart", "--limit-per-class", "1", "--workers", "1",
         "--styles", "openmoji", "noto"]  # the PyPI styles: what is tested is where the build writes


def test_data_build_never_deletes_a_class_folder_a_user_added(tmp_path, monkeypatch, capsys, make_tree):
    monkeypatch.chdir(tmp_path)
    out = Path("data/raw/emoji20")
    assert main([*BUILD, "--out", str(out)]) == 0
    mine = make_tree({"my-class": ("circle", 3)}, size=32, name="data/raw/emoji20")  # the user's own class
    before = tree_fingerprint(mine / "my-class")

    err = refused([*BUILD, "--out", str(out)], capsys)
    assert "my-class/my-class_000.png" in err and "did not write" in err
    assert tree_fingerprint(mine / "my-class") == before

    (out / outputs.MARKER).unlink()  # a build from before markers: its labels.csv lists what it wrote
    err = refused([*BUILD, "--out", str(out)], capsys)
    assert "my-class/" in err and tree_fingerprint(mine / "my-class") == before

    (out / "my-class").rename(tmp_path / "moved")  # the fix the error names: move it out, build again
    assert main([*BUILD, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["heart"]


def test_an_existing_partial_folder_is_deleted_only_if_a_build_wrote_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    partial = tmp_path / "data/raw/emoji20.partial"
    partial.mkdir(parents=True)
    (partial / "thesis.tex").write_text("three years of work")

    err = refused([*BUILD, "--out", "data/raw/emoji20"], capsys)
    assert "emoji20.partial" in err and "thesis.tex" in err
    assert (partial / "thesis.tex").read_text() == "three years of work"
    assert not (tmp_path / "data/raw/emoji20").exists()

    # what a killed build leaves: its marker (the files it was going to write) and some of them
    (partial / "thesis.tex").unlink()
    outputs.mark(partial, "build", ["heart/openmoji_2764-FE0F.png", "labels.csv", "ATTRIBUTION.md"])
    (partial / "heart").mkdir()
    (partial / "heart" / "openmoji_2764-FE0F.png").write_bytes(b"half")
    assert main([*BUILD, "--out", "data/raw/emoji20"]) == 0
    assert not partial.exists() and (tmp_path / "data/raw/emoji20/labels.csv").is_file()


# ------------------------------------------------------------------------------ report

@pytest.mark.slow
def test_report_never_writes_into_a_source_nor_where_a_study_name_points(tiny_version, mlflow_store, tmp_path,
                                                                          monkeypatch, capsys, make_tree):
    import optuna

    from research import configfile
    from research.sweep import SweepSpec, make_storage, sweep

    monkeypatch.chdir(tmp_path)
    source = make_tree({"heart": ("circle", 3), "drink": ("square", 3)}, size=32, name="data/raw/tiny")
    storage = f"journal:{tmp_path / 'study.journal'}"
    spec = tiny_sweep_spec(tiny_version, tmp_path / "ckpt", "tiny", n_trials=1, epochs=1,
                           space={"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}})
    sweep(configfile.from_dict(SweepSpec, spec), storage)
    optuna.copy_study(from_study_name="tiny", from_storage=make_storage(storage), to_storage=make_storage(storage),
                      to_study_name="../escape")
    before = tree_fingerprint(tmp_path)
    before = {k: v for k, v in before.items() if not k.startswith(("mlruns", "reports"))}

    err = refused(["report", "--study", "tiny", "--storage", storage, "--no-log", "--out", source / "heart"], capsys)
    assert "holds images" in err or "source tree" in err, err
    err = refused(["report", "--study", "../escape", "--storage", storage, "--no-log"], capsys)
    assert "not a plain folder name" in err and "--out" in err
    after = {k: v for k, v in tree_fingerprint(tmp_path).items() if not k.startswith(("mlruns", "reports"))}
    assert after == before  # no report.md or figure among the images, nothing at ./escape

    assert main(["report", "--study", "tiny", "--storage", storage, "--no-log"]) == 0
    assert main(["report", "--study", "tiny", "--storage", storage, "--no-log"]) == 0  # its own folder again
    assert outputs.stage_of(tmp_path / "reports/tiny") == "report"
    assert {"report.md", "report.html", "report.json"} <= outputs.recorded_files(tmp_path / "reports/tiny", "report")


# ------------------------------------------------------------------------------ the property

VOCAB = ["..", ".", "", "train", "heart", "x.png", "new.png", "link_src", "link_abs", "link_up", "link_in",
         "file_link", "a.png", outputs.MARKER, "sub dir", "é.png", "a\\b", "nul\x00", "line\nbreak", "C:", "...",
         "manifest.csv", "~"]


def random_path(rng: random.Random, world: Path) -> str:
    rel = "/".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 5)))
    prefix = rng.choice(["", "", "", "/", f"{world}/", f"{world}/out/", f"{world}/src/"])
    return prefix + rel


def make_world(root: Path, make_tree) -> Path:
    """src (a class-per-folder tree), clean (another stage's output), notes.txt, and out: a split's output
    holding symlinks that point back into src, to clean, above itself and into itself."""
    make_tree({"heart": ("circle", 2), "drink": ("square", 2)}, size=16, name=f"{root.name}/src")
    write_clean_dir(root / "src", root / "clean")
    outputs.mark(root / "clean", "clean")
    (root / "notes.txt").write_text("notes")
    out = root / "out"
    (out / "train" / "heart").mkdir(parents=True)
    (out / "train" / "heart" / "x.png").write_bytes(b"x")
    (out / "manifest.csv").write_text("path\ntrain/heart/x.png\n")
    (out / "version.json").write_text("{}")
    outputs.mark(out, "split", ["train/heart/x.png", "manifest.csv", "version.json"])
    os.symlink("../src", out / "link_src")
    os.symlink(root / "clean", out / "link_abs")
    os.symlink("../..", out / "train" / "link_up")
    os.symlink("..", out / "train" / "link_in")
    os.symlink("../src/heart/heart_000.png", out / "file_link")
    return out


def outside(world: Path, out: Path) -> dict[str, tuple]:
    rel = out.relative_to(world).as_posix()
    return everything_but(world, rel)


@pytest.mark.slow
def test_property_random_paths_never_change_anything_outside_the_output(tmp_path, make_tree):
    rng = random.Random(26)
    world = tmp_path / "world"
    out = make_world(world, make_tree)
    before = outside(world, out)
    written = refused_count = 0

    # every file a stage writes: output_path, then the write
    for _ in range(400):
        rel = random_path(rng, world)
        try:
            path = outputs.output_path(out, rel)
        except ConfigError:
            refused_count += 1
            continue
        assert out.resolve() in path.resolve().parents, rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"written")
        except OSError:  # a folder where the file would go, or a file where a folder would: refused by the OS
            continue
        written += 1
    assert outside(world, out) == before
    assert written > 20 and refused_count > 200, (written, refused_count)

    # every folder a stage deletes: remove_own, whatever its marker lists
    removed = kept = 0
    for i in range(60):
        scratch = make_world(tmp_path / f"w{i}", make_tree)
        listed = {random_path(rng, scratch.parent) for _ in range(rng.randint(0, 8))}
        names = ["train/heart/x.png", "manifest.csv", "version.json", "link_src", "link_abs", "file_link",
                 "train/link_up", "train/link_in", "link_src/heart/heart_000.png", "train/link_in/manifest.csv",
                 "../notes.txt", "../src/heart/heart_000.png"]
        listed |= set(names if rng.random() < 0.5 else rng.sample(names, rng.randint(0, len(names))))
        outputs.mark(scratch, "split", listed)
        if rng.random() < 0.3:
            (scratch / "train" / "heart" / "user.png").write_bytes(b"user")
        ahead = outside(scratch.parent, scratch)
        try:
            outputs.remove_own(scratch, "split")
            removed += 1
        except ConfigError as exc:
            assert "did not write" in str(exc)
            assert scratch.is_dir()
            kept += 1
        assert outside(scratch.parent, scratch) == ahead, listed
    assert removed > 3 and kept > 10, (removed, kept)

    # every output folder a stage chooses: check_folder, then its marker and a file through output_path
    guarded = ("src", "clean", "out", "notes.txt")
    fixed = {name: tree_fingerprint(world / name) if (world / name).is_dir() else (world / name).read_bytes()
             for name in guarded}
    chosen = 0
    for _ in range(300):
        cand = world / random_path(rng, world).lstrip("/").replace("\x00", "").replace("\n", "")
        if cand.resolve() != world.resolve() and world.resolve() not in cand.resolve().parents:
            continue  # `..` climbed out of the world: an --out there is the user's choice, not this test's
        try:
            outputs.check_folder("eda", cand, [world / "src"])
            outputs.mark(cand, "eda")
            outputs.output_path(cand, "summary.json").write_text("{}")
            chosen += 1
        except ConfigError:
            continue
        except OSError:  # e.g. a folder under notes.txt: the file system refuses, nothing is written
            continue
        for name in guarded:
            now = tree_fingerprint(world / name) if (world / name).is_dir() else (world / name).read_bytes()
            assert now == fixed[name], (cand, name)
    assert chosen > 5, chosen
