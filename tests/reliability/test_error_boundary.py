"""Issue 26 (items 3-6): every failure a user can fix is one `error:` line (exit 2), never a traceback.

Tracking stores that cannot serve, a full disk, names over 255 bytes, YAML/JSON/encoding errors, numbers out of
range, bad storage URIs, sweep specs Optuna would refuse hours later: each case runs the real command (a fresh
`python -m research` process where the process is the point: stores, servers, a full disk, processes started
together; `research.cli.main` in this process otherwise, the same boundary) and checks the one line, the exit
code and that nothing was created. A bug still shows its traceback, and exit codes say when nothing was done.

A full disk is a private tmpfs of a few KB or MB (`unshare -rm`: a user namespace, no root needed); where this
machine does not allow that, those tests are skipped.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from research import config as config_mod
from research.data.image import MAX_PIXELS
from tests.conftest import write_clean_dir
from tests.reliability import (
    REPO,
    cli_env,
    files_under,
    research_cmd,
    run_cli,
    run_main,
    tiny_sweep_spec,
    tiny_train_config,
)

LONG = "a" * 300  # one path component over the file system's limit (NAME_MAX: 255 bytes)


def assert_one_error_line(code: int, out: str, err: str, needles: list[str], exit_code: int = 2) -> str:
    """Exit code 2, exactly one `error:` line naming the needles, no traceback anywhere; returns the line."""
    assert code == exit_code, (code, err[-3000:])
    assert "Traceback" not in out + err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def experiments_with_runs() -> dict[str, int]:
    """MLflow experiment name -> its run count, in the test's store."""
    import mlflow

    client = mlflow.MlflowClient()
    return {e.name: len(client.search_runs([e.experiment_id])) for e in client.search_experiments()}


# ---------------------------------------------------------------------------------------- tracking stores (case 5)

def serve(answer: bytes | None) -> str:
    """A local HTTP endpoint that answers every request with `answer`, or (None) accepts and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def loop():
        while True:
            conn, _ = server.accept()
            if answer is None:
                held.append(conn)  # open, silent
                continue
            conn.recv(65536)
            conn.sendall(answer)
            conn.close()

    threading.Thread(target=loop, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}"


HTML = b"<!DOCTYPE html><html><body>Welcome to nginx!</body></html>"
NOT_MLFLOW = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
              % (len(HTML), HTML))


def corrupt_store(work: Path) -> str:
    (work / "store").mkdir()
    (work / "store" / "mlflow.db").write_bytes(b"not an sqlite file " * 200)
    return f"sqlite:///{work / 'store' / 'mlflow.db'}"


def folder_store(work: Path) -> str:
    (work / "store").mkdir()
    return f"sqlite:///{work / 'store'}"


STORES = {  # case -> (the URI it makes, what the error line must say)
    "corrupt sqlite file": (corrupt_store, ["mlflow.db", "file is not a database", "move it away"]),
    "sqlite URI of a folder": (folder_store, ["names a folder", "mlflow.db"]),
    "file store URI": (lambda work: f"file://{work / 'x'}", ["file store", "sqlite:///"]),
    "http server that is not MLflow": (lambda work: serve(NOT_MLFLOW), ["not as an MLflow tracking server",
                                                                        "HTTP 200, text/html"]),
    "server that never answers": (lambda work: serve(None), ["did not answer within 5 s"]),
}


@pytest.mark.parametrize("case", list(STORES))
@pytest.mark.slow
def test_a_tracking_store_that_cannot_serve_is_one_error_line(case, tmp_path):
    make, needles = STORES[case]
    work = tmp_path / "work"
    work.mkdir()
    uri = make(tmp_path)
    env = cli_env(MLFLOW_TRACKING_URI=uri, RESEARCH_MLRUNS=str(tmp_path / "home"))
    out, seconds = run_cli("runs", cwd=work, env=env, timeout=120)
    line = assert_one_error_line(out.returncode, out.stdout, out.stderr, needles)
    assert uri in line
    assert seconds < 30  # MLflow's own retries took 36 s on a silent server, printing a stack of ReadTimeouts


@pytest.mark.slow
def test_the_traceback_of_an_expected_error_is_in_the_log_file(tmp_path):
    uri = corrupt_store(tmp_path)
    out, _ = run_cli("runs", cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=uri), timeout=120)
    assert_one_error_line(out.returncode, out.stdout, out.stderr, ["file is not a database"])
    [log] = (tmp_path / "store" / "logs").glob("runs-*.log")  # logs/ beside the sqlite store
    assert f"log: {log.relative_to(tmp_path)}" in out.stderr  # shown relative to the working directory
    text = log.read_text()
    assert "Traceback" in text and "sqlite3.DatabaseError: file is not a database" in text


# ---------------------------------------------------------------------------------------- a fresh store (case 6)

@pytest.mark.slow
def test_commands_started_together_on_a_fresh_store_all_open_it(tmp_path):
    """MLflow creates a new store's tables on first open; four at once raced ("table ... already exists")."""
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}",
                  RESEARCH_MLRUNS=str(tmp_path / "fresh"))
    procs = [subprocess.Popen(research_cmd("runs"), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
        assert "Traceback" not in output, output[-3000:]


# ---------------------------------------------------------------------------------------- a full disk (case 7)

def small_disks() -> bool:
    """Whether `unshare -rm` may mount a tmpfs here (user namespaces allowed)."""
    if not shutil.which("unshare"):
        return False
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return done.returncode == 0


needs_small_disk = pytest.mark.skipif(not small_disks(), reason="no user namespaces here: cannot mount a tmpfs")


def on_a_small_disk(kb: int, mountpoint: Path, script: str, cwd: Path, env: dict, timeout: float = 300):
    """Run shell `script` where `mountpoint` is a fresh tmpfs of `kb` KB. The tmpfs lives as long as the script:
    the script inspects what it left."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o size={kb}k tmpfs '{mountpoint}' && {script}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def research_sh(*args) -> str:
    return " ".join(f"'{a}'" for a in research_cmd(*args))


@needs_small_disk
@pytest.mark.slow
def test_split_on_a_full_disk_is_one_error_line_and_leaves_nothing(tmp_path, make_tree):
    clean = write_clean_dir(make_tree({"a": ("circle", 12), "b": ("square", 12), "c": ("stripe", 12)}),
                            tmp_path / "clean")
    out = tmp_path / "versions"
    done = on_a_small_disk(64, out, f"{research_sh('split', clean, '--version', 'v1', '--out', out)}; "
                                    f"echo rc=$?; echo \"left:[$(ls -A '{out}')]\"", tmp_path, cli_env())
    err = done.stdout.split("rc=")[0] + done.stderr
    assert "rc=2" in done.stdout, done.stdout + done.stderr
    assert_one_error_line(2, "", err, ["no space left", "free space"])
    assert "left:[]" in done.stdout  # the temporary version folder was removed


STATUSES = ("import mlflow; c = mlflow.MlflowClient(); e = c.get_experiment_by_name('reliability'); "
            "print('STATUS', [r.info.status for r in c.search_runs([e.experiment_id])])")


@needs_small_disk
@pytest.mark.slow
def test_train_on_a_full_disk_ends_its_run_failed_and_runs_still_works(tmp_path, tiny_version):
    """12 MB hold the store and the epochs but not the model's weights: `database or disk is full` mid-way
    through logging the model. The run must end FAILED (it stayed RUNNING), and `runs` afterwards on the
    same full disk must work (it crashed writing its log file)."""
    home = tmp_path / "mlruns"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(tiny_train_config(tiny_version, tmp_path / "ckpt")))
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}", RESEARCH_MLRUNS=str(home))
    script = (f"{research_sh('train', '--config', cfg)}; echo rc=$?; "
              f"{research_sh('runs')} > /dev/null; echo runs_rc=$?; '{sys.executable}' -c \"{STATUSES}\"")
    done = on_a_small_disk(12 * 1024, home, script, tmp_path, env, timeout=600)
    train_err = done.stdout.split("rc=")[0] + done.stderr
    assert "rc=2" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert_one_error_line(2, "", train_err, ["database or disk is full", "free space"])
    assert "warning: no log file" in done.stderr  # the log file could not be written either: said once, no crash
    assert "runs_rc=0" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "STATUS ['FAILED']" in done.stdout, done.stdout[-3000:]
    assert (tmp_path / "ckpt").is_dir()  # the checkpoint stays


@pytest.mark.slow
def test_runs_goes_on_when_its_log_file_cannot_be_written(tmp_path):
    home = tmp_path / "mlruns"
    home.mkdir()
    (home / "logs").write_text("a file where the log folder goes")  # as a full disk: the log cannot be created
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}", RESEARCH_MLRUNS=str(home))
    out, _ = run_cli("runs", cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr and "Logging error" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.count("warning: no log file") == 1, out.stderr


# ---------------------------------------------------------------------------------------- configs (case 8)

def train_config_file(tmp_path: Path, version: Path) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config(version, tmp_path / "ckpt")))
    return path


def latin1_config(tmp_path: Path) -> list:
    path = tmp_path / "latin.yaml"
    path.write_bytes("# café au lait\nepochs: 1\n".encode("latin-1"))
    return ["train", "--config", path]


def spec_file(tmp_path: Path, name: str, text: str) -> list:
    (tmp_path / name).write_text(text)
    return ["sweep", tmp_path / name, "--storage", f"journal:{tmp_path / 'study.journal'}"]


CONFIGS = {  # case -> (the command line after `research`, what the error line must say)
    "--set lr=[": (lambda t, c: ["train", "--config", c, "--set", "lr=["], ["'lr=['", "not valid YAML", "quote"]),
    "--set lr=1 --set lr.x=2": (lambda t, c: ["train", "--config", c, "--set", "lr=1", "--set", "lr.x=2"],
                                ["lr is already set to 1", "'x'"]),
    "--set a Python object": (lambda t, c: ["train", "--config", c, "--set",
                                            f"lr=!!python/object/apply:os.mkdir ['{t / 'made'}']"],
                              ["not valid YAML", "python/object/apply:os.mkdir"]),
    "a non-UTF-8 --config": (lambda t, c: latin1_config(t), ["latin.yaml", "not UTF-8", "at byte 5"]),
    "an invalid JSON spec": (lambda t, c: spec_file(t, "spec.json", "{not json"), ["spec.json", "not valid JSON"]),
    "a missing JSON spec": (lambda t, c: ["sweep", t / "gone.json"], ["gone.json", "does not exist"]),
    "an empty spec": (lambda t, c: spec_file(t, "empty.yaml", ""), ["has no `base` and no `space`",
                                                                      "sweeps/demo.yaml"]),
    "a spec without base or space": (lambda t, c: spec_file(t, "nobase.yaml", "n_trials: 2\n"),
                                     ["has no `base` and no `space`"]),
    "--seed 99999999999999999999": (lambda t, c: ["train", "--config", c, "--seed", "99999999999999999999"],
                                    ["seed=99999999999999999999", "[0, 4294967295]", "numpy"]),
    "step_size=0 with --lr-schedule step": (lambda t, c: ["train", "--config", c, "--lr-schedule", "step",
                                                          "--set", "step_size=0"], ["step_size=0", ">= 1"]),
    "--device mps without one": (lambda t, c: ["train", "--config", c, "--device", "mps"],
                                 ["'mps' is not available", "--device auto"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.slow
def test_a_bad_config_is_one_error_line_before_anything_runs(case, tmp_path, tiny_version, mlflow_store, capsys,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    make, needles = CONFIGS[case]
    code, out, err = run_main(capsys, *make(tmp_path, train_config_file(tmp_path, tiny_version)))
    assert_one_error_line(code, out, err, needles)
    assert not (tmp_path / "made").exists()  # the YAML tag built nothing
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "study.journal").exists()
    assert not (tmp_path / "data").exists()  # no decode cache
    assert sum(experiments_with_runs().values()) == 0


# ---------------------------------------------------------------------------------------- labels.csv (case 9)

LABELS = {
    "without a path column": (b"file,is_photo\na/a_000.png,0\n", ["no `path` column", "file, is_photo"]),
    "empty": (b"", ["is empty"]),
    "in Latin-1": ("path,is_photo,source\na/a_000.png,0,café\n".encode("latin-1"), ["not UTF-8", "byte"]),
}


@pytest.mark.parametrize("case", list(LABELS))
def test_a_bad_labels_csv_is_one_error_line(case, tmp_path, make_tree, capsys):
    content, needles = LABELS[case]
    src = make_tree({"a": ("circle", 6), "b": ("photo", 6)}, size=32)
    (src / "labels.csv").write_bytes(content)
    code, out, err = run_main(capsys, "clean", src, "--method", "score", "--no-log", "--workers", "1",
                              "--out", tmp_path / "clean")
    assert_one_error_line(code, out, err, ["labels.csv", *needles])


# ---------------------------------------------------------------------------------------- long names (case 10)

def long_name_commands(tmp_path: Path, make_tree) -> dict[str, list]:
    src = make_tree({"a": ("circle", 6), "b": ("square", 6), "c": ("stripe", 6)}, size=32)
    clean = write_clean_dir(src, tmp_path / "clean")
    return {
        "split --version": ["split", clean, "--version", LONG, "--out", tmp_path / "versions"],
        "clean --out": ["clean", src, "--method", "score", "--no-log", "--workers", "1", "--out", tmp_path / LONG],
        "train --dataset": ["train", "--dataset", LONG, "--model", "resnet18", "--device", "cpu"],
        "data scan --out": ["data", "scan", src, "--workers", "1", "--out", tmp_path / f"{LONG}.csv"],
    }


@pytest.mark.parametrize("command", ["split --version", "clean --out", "train --dataset", "data scan --out"])
@pytest.mark.slow
def test_a_name_over_255_bytes_is_one_error_line(command, tmp_path, make_tree, mlflow_store, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = long_name_commands(tmp_path, make_tree)[command]
    code, out, err = run_main(capsys, *args)
    line = assert_one_error_line(code, out, err, ["aaaaaaaaaa"])
    assert "255" in line or "plain name" in line  # the limit (or the version-name rule, which may come first)


# ---------------------------------------------------------------------------------------- storage (case 11)

def sweep_spec(tmp_path: Path, version: Path, **changes) -> Path:
    spec = tiny_sweep_spec(version, tmp_path / "ckpt", "s", n_trials=2, epochs=1, **changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


STORAGES = {
    "journal:FOLDER": (lambda t: ["--storage", f"journal:{t / 'jdir'}"], ["names a folder", "optuna.journal"]),
    "mysql:// without its driver": (lambda t: ["--storage", "mysql://u:secret@127.0.0.1/db"],
                                    ["driver is not installed", "MySQLdb", "u:***@"]),
    "--study-name ''": (lambda t: ["--study-name", "", "--storage", f"journal:{t / 'study.journal'}"],
                        ["study_name is empty", "--study-name NAME"]),
}


@pytest.mark.parametrize("case", list(STORAGES))
@pytest.mark.slow
def test_a_bad_storage_or_study_name_is_one_error_line_and_starts_nothing(case, tmp_path, tiny_version, mlflow_store,
                                                                            capsys):
    (tmp_path / "jdir").mkdir()
    args, needles = STORAGES[case]
    code, out, err = run_main(capsys, "sweep", sweep_spec(tmp_path, tiny_version), *args(tmp_path))
    line = assert_one_error_line(code, out, err, needles)
    assert "secret" not in line
    assert files_under(tmp_path / "jdir") == [] and not (tmp_path / "study.journal").exists()
    assert sum(experiments_with_runs().values()) == 0  # no parent run


# ---------------------------------------------------------------------------------------- specs (case 12)

SPECS = {  # the spec change -> what the error line must say (tests/reliability/test_bad_configs.py: load_spec)
    "objective metric nonexistent": ({"objective": {"metric": "nonexistent"}}, ["objective.metric='nonexistent'",
                                                                                  "val_f1_macro"]),
    "hyperband reduction_factor 1": ({"pruner": {"name": "hyperband", "reduction_factor": 1}},
                                     ["pruner (hyperband)", "reduction_factor"]),
    "step 0": ({"space": {"lr": {"type": "float", "low": 1e-3, "high": 0.1, "step": 0}}}, ["space.lr", "step > 0"]),
    "int step 0.5": ({"space": {"epochs": {"type": "int", "low": 1, "high": 2, "step": 0.5}}},
                     ["space.epochs", "step=0.5"]),
    "step with log": ({"space": {"lr": {"type": "float", "low": 1e-3, "high": 0.1, "step": 0.01, "log": True}}},
                      ["space.lr", "log"]),
}


@pytest.mark.parametrize("case", list(SPECS))
@pytest.mark.slow
def test_a_spec_optuna_would_refuse_fails_before_any_study_or_run(case, tmp_path, tiny_version, mlflow_store,
                                                                   capsys):
    changes, needles = SPECS[case]
    journal = tmp_path / "study.journal"
    code, out, err = run_main(capsys, "sweep", sweep_spec(tmp_path, tiny_version, **changes),
                              "--storage", f"journal:{journal}")
    assert_one_error_line(code, out, err, needles)
    assert not journal.exists()  # no study, no trial
    assert sum(experiments_with_runs().values()) == 0  # no parent run, no child run


# ---------------------------------------------------------------------------------------- numbers (case 13)

@pytest.mark.slow
def test_image_size_beyond_the_pixel_limit_is_refused_before_any_cache(tmp_path, tiny_version):
    """100000 px made a 630 GB sparse cache file, then died allocating. A child process, its files capped at
    1 GB (RLIMIT_FSIZE): without the bound it fails there in seconds instead of filling this machine."""
    import resource

    def cap_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, 1 << 30))

    home = tmp_path / "mlruns"
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}", RESEARCH_MLRUNS=str(home))
    out = subprocess.run(research_cmd("train", "--config", train_config_file(tmp_path, tiny_version),
                                      "--image-size", "100000"), cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300, preexec_fn=cap_files)
    assert_one_error_line(out.returncode, out.stdout, out.stderr, ["image_size=100000", "[16, 9459]", "MAX_PIXELS"])
    assert not (tmp_path / "data").exists()


def test_every_number_a_user_can_set_has_a_range():
    import dataclasses
    import typing

    for cls, ranges in ((config_mod.TrainConfig, config_mod.train_ranges()),
                        (config_mod.AugmentConfig, config_mod.AUGMENT_RANGES)):
        hints = typing.get_type_hints(cls)
        numbers = {f.name for f in dataclasses.fields(cls)
                   if {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],))}
        assert numbers == set(ranges), (cls.__name__, numbers ^ set(ranges))
    assert config_mod.image_size_max() ** 2 <= MAX_PIXELS < (config_mod.image_size_max() + 1) ** 2


# ---------------------------------------------------------------------------------------- exit codes (case 14)

@pytest.mark.slow
def test_predict_exits_1_when_no_file_could_be_predicted(tmp_path, mlflow_store, capsys):
    from tests.test_serving import log_tiny_model

    run_id = log_tiny_model(tmp_path / "meta")
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.png").write_text("not an image")
    code, out, err = run_main(capsys, "predict", bad, "--model", f"runs:/{run_id}/model")
    assert_one_error_line(code, out, err, ["none of the 3 file(s) could be predicted", "x0.png"], exit_code=1)
    shutil.copy(REPO / "docs" / "class_counts.png", bad / "good.png")
    assert run_main(capsys, "predict", bad, "--model", f"runs:/{run_id}/model")[0] == 0  # one predicted: success


@pytest.mark.slow
def test_sweep_exits_1_when_the_study_ends_without_a_completed_trial(tmp_path, tiny_version, mlflow_store, capsys,
                                                                      monkeypatch):
    """An lr that diverges in the first epoch: every trial fails (the worker stops after 3 in a row)."""
    monkeypatch.chdir(tmp_path)
    spec = sweep_spec(tmp_path, tiny_version, space={"lr": {"type": "float", "low": 1e6, "high": 1e7, "log": True}})
    code, out, err = run_main(capsys, "sweep", spec, "--storage", f"journal:{tmp_path / 'study.journal'}")
    assert_one_error_line(code, out, err, ["study s ended with no completed trial", "3 fail"], exit_code=1)


# ---------------------------------------------------------------------------------------- the boundary itself

def test_a_bug_still_shows_its_traceback_and_the_log_path(mlflow_store, tmp_path, capsys, monkeypatch):
    import research.runs

    def broken(args):
        return {}["a key that is not there"]

    monkeypatch.setattr(research.runs, "run", broken)
    code, out, err = run_main(capsys, "runs")
    assert code == 1
    assert "Traceback" in err and "KeyError: 'a key that is not there'" in err
    assert not any(line.startswith("error: ") for line in err.splitlines())
    log = Path(err.split("log: ")[1].split()[0])
    assert "KeyError: 'a key that is not there'" in log.read_text()


@pytest.mark.parametrize("exc, needle", [
    (OSError(28, "No space left on device", "/data/v3/x.png"), "no space left on the disk holding /data/v3/x.png"),
    (OSError(36, "File name too long", "/tmp/" + LONG), f"is {len(LONG)} bytes"),
    (OSError(30, "Read-only file system", "/ro/x"), "/ro/x is on a read-only file system"),
    (PermissionError(13, "Permission denied", "/etc/x"), "/etc/x: permission denied"),
    (json.JSONDecodeError("Expecting value", "x", 0), "not valid JSON"),
    (UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte"), "not UTF-8 text"),
])
def test_failures_of_the_machine_and_of_files_are_one_line(exc, needle):
    from research.errors import user_message

    assert needle in user_message(exc)


def test_other_exceptions_are_bugs():
    from research.errors import user_message

    for exc in (KeyError("x"), TypeError("x"), OSError(5, "Input/output error"), ZeroDivisionError()):
        assert user_message(exc) is None


def test_the_tracking_store_is_named_when_its_disk_is_full(mlflow_store):
    import sqlalchemy

    from research.errors import user_message

    exc = sqlalchemy.exc.OperationalError("INSERT", {}, Exception("database or disk is full"))
    assert user_message(exc) == (f"the tracking store {mlflow_store} cannot be used (database or disk is full). "
                                 "The disk holding it is full: free space there, then run the command again.")

