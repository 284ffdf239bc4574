"""The results file of `benchmarks/gpu_e2e.sh`: one JSON, rewritten after every step.

The script runs the real commands; this module only reads what each step left in the workspace (the
dataset files, the Optuna journal, the MLflow store, the step's log, the benchmarks' JSON) and records
the step's seconds and figures, or its error:

    python -m benchmarks.gpu_e2e init --work W --out-dir D --smoke 0 --set trials=24 ...   # prints the path
    python -m benchmarks.gpu_e2e record --result R --work W --step sweep --rc 0 --millis 181234
    python -m benchmarks.gpu_e2e show --result R
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import re
import socket
from pathlib import Path

STUDY = "transfer_gpu_e2e"  # the script's --study-name
MODEL_NAME = "illustration-classifier"
ERROR_LINES = 25  # of a failed step's log, kept in the JSON
# the targets for one device run
TARGETS = {"trials_completed": 20, "vgg16_v2_real_img_per_s": 3000, "vgg16_v2_pipeline_efficiency": 0.9}


# ------------------------------------------------------------------------------ the file

def device_slug() -> str:
    """`h200` for an NVIDIA H200 (the GPU the run trains on), else `cpu-<host>`."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower().replace("nvidia", "")
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"
    return f"cpu-{socket.gethostname()}"


def machine() -> dict:
    import torch

    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
            "gpus": torch.cuda.device_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
    return info


def init(work: Path, out_dir: Path, smoke: bool, settings: dict) -> Path:
    now = _dt.datetime.now(_dt.UTC)
    path = out_dir / f"gpu-e2e-{device_slug()}-{now.date().isoformat()}.json"
    data = {"issue": 27, "mode": "smoke" if smoke else "device", "started": now.isoformat(timespec="seconds"),
            "workspace": str(work), "machine": machine(), "settings": settings, "ok": False, "steps": {}}
    write(path, data)
    return path


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def record(path: Path, work: Path, step: str, rc: int | None, millis: int | None, skipped: str | None) -> dict:
    """Add one step's outcome: seconds and figures when it worked, else its exit status and the end of its log."""
    data = json.loads(path.read_text())
    entry: dict = {"ok": rc == 0 and not skipped}
    if skipped:
        entry["skipped"] = skipped
    else:
        entry |= {"rc": rc, "seconds": round(millis / 1000, 2)}
        log = work / "logs" / f"{step}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        if rc != 0:
            entry["error"] = error_tail(text, rc)
        try:
            entry |= FIGURES[step](work, text, entry)
        except Exception as exc:  # a failed step may leave nothing to read: its error says why
            if rc == 0:
                entry["figures_error"] = f"{type(exc).__name__}: {exc}"
                entry["ok"] = False
    data["steps"][step] = entry
    data["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    data["failed_steps"] = [name for name, e in data["steps"].items() if not e["ok"]]
    data["ok"] = not data["failed_steps"]
    data["summary"] = summary(data)
    write(path, data)
    return entry


def error_tail(text: str, rc: int) -> str:
    why = {124: "timed out (the step's limit)", 137: "killed after its time limit", 130: "interrupted"}.get(rc, "")
    lines = [line for line in text.splitlines() if line.strip()][-ERROR_LINES:]
    return (f"exit {rc}{f', {why}' if why else ''}\n" + "\n".join(lines)).strip()


# ------------------------------------------------------------------------------ figures per step

def data_build(work: Path, text: str, entry: dict) -> dict:
    with (work / "data/raw/emoji20/labels.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {"images": len(rows), "photos": sum(r["is_photo"] == "1" for r in rows),
            "classes": len({r["class"] for r in rows})}


def data_clean(work: Path, text: str, entry: dict) -> dict:
    info = json.loads((work / "data/clean/emoji20/clean.json").read_text())
    return {"method": info.get("method"), "features": info.get("features"), "kept": info.get("n_kept"),
            "quarantined": info.get("n_quarantined"), "photo_f1": (info.get("metrics") or {}).get("f1")}


def data_split(work: Path, text: str, entry: dict) -> dict:
    info = json.loads((work / "data/versions/v3/version.json").read_text())
    return {"version": info["name"], "digest": info["digest"], "classes": len(info["classes"]),
            "images": {split: sum(counts.values()) for split, counts in info["counts"].items()}}


def bench_loader(work: Path, text: str, entry: dict) -> dict:
    loader = json.loads((work / "bench.json").read_text())["loader"]
    rows = {size: {"folder_img_per_s": r["folder"]["img_per_s"], "cached_img_per_s": r["cached"]["img_per_s"],
                   "speedup": r["speedup"], "cache_build_s": r["cache_build_s"], "train_images": r["train_images"],
                   "folder_workers": r["folder_workers"]}
            for size, r in loader["by_size"].items()}
    return {"device": loader["machine"]["device"], "by_size": rows}


def bench_train(work: Path, text: str, entry: dict) -> dict:
    train = json.loads((work / "bench.json").read_text())["train"]
    keep = ("synthetic_img_per_s", "real_img_per_s", "pipeline_efficiency")
    return {"device": train["machine"]["device"], "image_size": train["image_size"],
            "batch_size": train["batch_size"], "amp_bf16": train["amp_bf16"], "channels_last": train["channels_last"],
            "by_model": {name: {k: r[k] for k in keep} for name, r in train["by_model"].items()}}


def sweep(work: Path, text: str, entry: dict) -> dict:
    """Trials by state from the study's own storage, trials per minute of the step's wall time, the best trial and
    what its MLflow run logged about the CUDA path (device, bf16, channels_last, compile)."""
    import optuna

    from research.sweep import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY, storage=make_storage(f"journal:{work / 'mlruns/optuna.journal'}"))
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    finished = complete + [t for t in trials if t.state.name == "PRUNED"]
    minutes = entry.get("seconds", 0) / 60
    out = {"study": STUDY, "trials": states, "trials_completed": len(complete), "trials_finished": len(finished),
           "trials_per_minute": round(len(finished) / minutes, 2) if minutes else None,
           "completed_per_minute": round(len(complete) / minutes, 2) if minutes else None,
           "trial_seconds": sorted(round(t.duration.total_seconds(), 1) for t in finished if t.duration),
           # workers drawing the same params would train one trial several times
           "distinct_param_sets": len({json.dumps(t.params, sort_keys=True) for t in trials if t.params}),
           "models": sorted({t.params.get("model", "?") for t in complete})}
    placement = [line.strip() for line in text.splitlines() if "workers share" in line or "GPU each" in line]
    if placement:
        out["placement"] = placement[0]
    if complete:
        best = study.best_trial
        out |= {"best_trial": best.number, "best_val_f1_macro": best.value, "best_params": best.params,
                "best_test_f1_macro": best.user_attrs.get("test_f1_macro"),
                "best_run_logged": logged_params(best.user_attrs.get("mlflow_run_id"))}
    return out


def logged_params(run_id: str | None) -> dict:
    if not run_id:
        return {}
    import mlflow

    # amp, channels_last and compile are logged resolved: True on CUDA unless a spec turned them off
    params = mlflow.MlflowClient().get_run(run_id).data.params
    return {k: params[k] for k in ("model", "image_size", "device", "amp", "channels_last", "compile") if k in params}


def promote(work: Path, text: str, entry: dict) -> dict:
    """The champion as the registry holds it, with its run's best val and test figures."""
    import mlflow

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    run = client.get_run(version.run_id)
    val = [m.value for m in client.get_metric_history(run.info.run_id, "val_f1_macro")]
    metrics = run.data.metrics
    return {"champion": {
        "uri": f"models:/{MODEL_NAME}@champion", "version": version.version, "run_id": run.info.run_id,
        "logged": logged_params(run.info.run_id), "val_f1_macro": max(val) if val else None,
        **{k: metrics.get(k) for k in ("test_accuracy", "test_f1_macro", "test_precision_macro",
                                       "test_recall_macro")}}}


def json_objects(text: str) -> list[dict]:
    """The JSON objects in a log: one per line, or one spread over lines (indented)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if found:
        return found
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            return [json.loads(text[start:end + 1])]
        except json.JSONDecodeError:
            pass
    return []


def predict_cpu(work: Path, text: str, entry: dict) -> dict:
    """The champion on the CPU over the test folder: images, read errors, accuracy against the folder's class."""
    rows = [r for r in json_objects(text) if "file" in r]
    if not rows:
        raise ValueError("no JSON prediction lines in the log")
    good = [r for r in rows if not r.get("error")]
    right = sum(Path(r["file"]).parent.name == r["label"] for r in good)
    seconds = entry.get("seconds") or 0
    return {"device": "cpu", "images": len(rows), "errors": len(rows) - len(good),
            "accuracy": round(right / len(good), 4) if good else None,
            "img_per_s_with_startup": round(len(rows) / seconds, 1) if seconds else None}


def served_check(work: Path, text: str, entry: dict) -> dict:
    """`predict --evaluate`'s own JSON (served accuracy and macro-F1 beside the logged ones, `equal`)."""
    found = [r for r in json_objects(text) if "equal" in r]
    if not found:
        raise ValueError("no JSON object with an 'equal' field in the log (is `predict --evaluate` there?)")
    result = found[-1]
    return {"equal": result["equal"], "evaluate": result}


FIGURES = {"data_build": data_build, "data_clean": data_clean, "data_split": data_split,
           "bench_loader": bench_loader, "bench_train": bench_train, "sweep": sweep, "promote": promote,
           "predict_cpu": predict_cpu, "served_check": served_check}


# ------------------------------------------------------------------------------ the headline

def summary(data: dict) -> dict:
    """The figures the issue asks for, in one place, and (on the device) whether they meet its targets."""
    steps = data["steps"]
    sweep_ = steps.get("sweep", {})
    champion = steps.get("promote", {}).get("champion", {})
    vgg = steps.get("bench_train", {}).get("by_model", {}).get("vgg16_v2", {})
    out = {
        "seconds": round(sum(e.get("seconds", 0) for e in steps.values()), 1),
        "trials_completed": sweep_.get("trials_completed"), "trials_per_minute": sweep_.get("trials_per_minute"),
        "champion_val_f1_macro": champion.get("val_f1_macro"), "champion_test_f1_macro": champion.get("test_f1_macro"),
        "served_equals_logged": steps.get("served_check", {}).get("equal"),
        "vgg16_v2_real_img_per_s": vgg.get("real_img_per_s"),
        "vgg16_v2_pipeline_efficiency": vgg.get("pipeline_efficiency"),
    }
    if data["mode"] == "device":
        out["targets_met"] = {key: out[key] is not None and out[key] >= target for key, target in TARGETS.items()}
    return out


def show(path: Path) -> None:
    data = json.loads(path.read_text())
    print(f"\n== {path}")
    for name, e in data["steps"].items():
        state = "ok" if e["ok"] else ("skipped: " + e["skipped"] if "skipped" in e else f"FAILED (exit {e.get('rc')})")
        print(f"{name:>13}  {e.get('seconds', 0):>7.1f} s  {state}")
    for key, value in data["summary"].items():
        print(f"{key:>30}  {value}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_e2e", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("init")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--smoke", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings recorded as given")
    p = sub.add_parser("record")
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--step", required=True, choices=list(FIGURES))
    p.add_argument("--rc", type=int)
    p.add_argument("--millis", type=int)
    p.add_argument("--skipped")
    p = sub.add_parser("show")
    p.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.action == "init":
        settings = {k: int(v) if v.isdigit() else v for k, v in (item.split("=", 1) for item in args.set)}
        print(init(args.work, args.out_dir, bool(args.smoke), settings))
    elif args.action == "record":
        record(args.result, args.work, args.step, args.rc, args.millis, args.skipped)
    else:
        show(args.result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
