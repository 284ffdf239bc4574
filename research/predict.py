"""`python -m research predict`: classify image files with a registered (or any logged) model.

The model is loaded once by URI (default `models:/illustration-classifier@champion`) through
`research.serving.load_model`; files are sent in batches as the pyfunc's own input (column
`image`, base64 bytes), so this command exercises exactly what a Python client or the HTTP
server gets. A file that cannot be read or decoded is a row with an error, never a crash.

Memory stays bounded whatever the inputs: files are read batch by batch, and a batch holds at most
`--batch-size` files and MAX_BATCH_BYTES of file bytes (a bigger file goes alone), so a folder of large
scans never sits in memory at once. Only regular files are read: a FIFO would block and a device
(/dev/zero) never ends, so each is a row with an error. The pixel limit is the model's own
(research.data.image.MAX_PIXELS).
"""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from research.errors import ConfigError
from research.serving import CHAMPION, MODEL_NAME, load_model

console = Console()
DEFAULT_URI = f"models:/{MODEL_NAME}@{CHAMPION}"
MAX_BATCH_BYTES = 16 << 20  # file bytes per model call (held as base64: 4/3 of that)
NOT_REGULAR = "not a regular file (fifo, socket or device); not read"


def image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def collect(paths: list[str | Path]) -> list[Path]:
    """Files named on the command line, plus every image file (by extension) under named directories.

    Hidden files and non-image extensions inside directories are skipped; a file named
    explicitly is always tried, whatever its name.
    """
    exts = image_extensions()
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in exts
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            out.extend(found)
        elif path.exists():
            out.append(path)
        else:
            raise ConfigError(f"{path} does not exist; pass image files or directories of images.")
    return out


def top_k(row: pd.Series, prob_columns: list[str], k: int = 3) -> list[tuple[str, float]]:
    values = [(c.removeprefix("p_"), float(row[c])) for c in prob_columns if pd.notna(row[c])]
    return sorted(values, key=lambda t: -t[1])[:k]


def file_size(path: Path) -> int:
    """Bytes of a regular file; 0 for anything else (its read reports why)."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def plan_batches(files: list[Path], batch_size: int, max_bytes: int = MAX_BATCH_BYTES) -> list[list[Path]]:
    """Files in order, grouped into model calls of at most `batch_size` files and `max_bytes` of file bytes.

    A file bigger than `max_bytes` goes alone: what is held at once is bounded by the biggest file, not the total.
    """
    batches: list[list[Path]] = []
    current: list[Path] = []
    held = 0
    for f in files:
        size = file_size(f)
        if current and (len(current) == batch_size or held + size > max_bytes):
            batches.append(current)
            current, held = [], 0
        current.append(f)
        held += size
    if current:
        batches.append(current)
    return batches


def read_payload(path: Path) -> tuple[str, str]:
    """(base64 of the file's bytes, "") or ("", why it was not read): only regular files are opened."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "", NOT_REGULAR
        return base64.b64encode(path.read_bytes()).decode("ascii"), ""
    except OSError as exc:
        return "", f"{type(exc).__name__}: {exc.strerror or exc}"


def predict_batch(model, files: list[Path]) -> pd.DataFrame:
    """The model's rows for `files` plus a `file` column; a read error wins over the model's (empty payload) error."""
    payloads, read_errors = zip(*(read_payload(f) for f in files))
    out = model.predict(pd.DataFrame({"image": list(payloads)})).reset_index(drop=True)
    out.insert(0, "file", [str(f) for f in files])
    out["error"] = [r or e for r, e in zip(read_errors, out["error"].astype(str))]
    return out


def predict_files(model, files: list[Path], batch_size: int = 64) -> pd.DataFrame:
    """One row per file: file, label, probability, top3, p_<class>..., error."""
    if batch_size <= 0:
        raise ConfigError(f"--batch-size {batch_size} must be > 0.")
    # each batch's bytes are read inside predict_batch and dropped when it returns
    frames = [predict_batch(model, chunk) for chunk in plan_batches(files, batch_size)]
    if not frames:
        return pd.DataFrame(columns=["file", "label", "probability", "top3", "error"])
    result = pd.concat(frames, ignore_index=True)
    probs = [c for c in result.columns if c.startswith("p_")]
    result.insert(3, "top3", [top_k(row, probs) for _, row in result.iterrows()])
    return result


def print_table(result: pd.DataFrame, uri: str) -> None:
    table = Table(title=f"{len(result)} file(s), model {uri}")
    for col in ("file", "label", "probability", "top-3"):
        table.add_column(col, justify="right" if col == "probability" else "left")
    for _, row in result.iterrows():
        if row["error"]:
            table.add_row(row["file"], "[red]unreadable", "", f"[red]{row['error']}")
            continue
        top3 = ", ".join(f"{c} {p:.2f}" for c, p in row["top3"])
        table.add_row(row["file"], row["label"], f"{row['probability']:.3f}", top3)
    console.print(table)
    bad = int((result["error"] != "").sum())
    if bad:
        console.print(f"[yellow]{bad} file(s) could not be read as images (listed above); the rest were classified.")


def json_lines(result: pd.DataFrame) -> list[str]:
    lines = []
    for _, row in result.iterrows():
        prob = row["probability"]
        record = {"file": row["file"], "label": row["label"], "probability": float(prob) if pd.notna(prob) else None,
                  "top3": [[c, p] for c, p in row["top3"]], "error": row["error"]}
        lines.append(json.dumps(record))
    return lines


# ------------------------------------------------------------------------------ served equals measured

LOGGED = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
# Largest difference in an image's served probability from its logged one that still counts as equal. Both sides
# are float32 forward passes on a CPU (~1e-7 apart); a served temperature other than the logged one moves them by
# 1e-2 or more while every label stays.
PROBABILITY_TOLERANCE = 1e-4


def evaluate_served(uri: str, dataset: str, split: str = "test", data_root: str | Path = "data/versions",
                    batch_size: int = 64) -> dict:
    """Predict every image of a dataset version's split through the model URI (the pyfunc's own input), and
    compare with what the model's training run logged: its test_* metrics and, for the test split, its
    predictions_test.csv image by image. `equal` is True only when every figure and every label agree and no
    image's probability is more than PROBABILITY_TOLERANCE from its logged one."""
    import mlflow

    from research.data.versions import load_version
    from research.inputs.decoded import split_items
    from research.metrics import classification_metrics
    from research.runlog import PREDICTIONS_FILE

    version = load_version(dataset, data_root)
    paths, labels = split_items(version, split)
    model = load_model(uri)
    result = predict_files(model, paths, batch_size)
    errors = result["error"] != ""
    if errors.any():
        raise ConfigError(f"{int(errors.sum())} image(s) of {version.name}/{split} could not be predicted, e.g. "
                          f"{result['file'][errors].iloc[0]}: {result['error'][errors].iloc[0]}.")
    index = {c: i for i, c in enumerate(version.classes)}
    served_labels = list(result["label"])
    served = classification_metrics(labels, [index.get(c, -1) for c in served_labels], len(version.classes))
    out = {"model": uri, "dataset": version.name, "dataset_digest": version.digest, "split": split,
           "images": len(paths), "served": {k: served[k] for k in LOGGED}}
    run_id = mlflow.models.get_model_info(uri).run_id
    if not run_id or split != "test":
        out.update(run_id=run_id, logged=None, equal=None)
        return out
    run = mlflow.MlflowClient().get_run(run_id)
    logged = {k: run.data.metrics.get(f"test_{k}") for k in LOGGED}
    out.update(run_id=run_id, logged=logged, trained_on_digest=run.data.params.get("dataset_digest"))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            logged_rows = pd.read_csv(mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=PREDICTIONS_FILE, dst_path=tmp))
        except Exception:  # a run logged before predictions_test.csv existed: the figures alone are compared
            logged_rows = None
    if logged_rows is not None:
        files = [p.relative_to(version.dir).as_posix() for p in paths]
        rows = logged_rows.set_index("file").reindex(files)
        out["mismatched_images"] = [f for f, label, want in zip(files, served_labels, rows["label"]) if label != want]
        gap = np.abs(result["probability"].astype(float).to_numpy() - rows["probability"].to_numpy()).max()
        out["max_probability_difference"] = float(gap)
    out["equal"] = (out["trained_on_digest"] == version.digest and all(logged[k] == out["served"][k] for k in LOGGED)
                    and not out.get("mismatched_images")
                    and out.get("max_probability_difference", 0.0) <= PROBABILITY_TOLERANCE)
    return out


def print_evaluation(out: dict) -> None:
    console.print(f"{out['model']} on {out['dataset']}/{out['split']} ({out['images']} images, served)")
    for key in LOGGED:
        logged = (out.get("logged") or {}).get(key)
        console.print(f"  {key:16} served {out['served'][key]:.6f}"
                      + (f"   logged by run {out['run_id']}: {logged:.6f}" if logged is not None else ""))
    if out["equal"] is None:
        console.print("  (nothing logged to compare with: only the test split has logged figures)")
    elif out["equal"]:
        console.print("[green]served equals logged[/], image for image")
    else:
        mismatched = out.get("mismatched_images") or []
        digest = "" if out["trained_on_digest"] == out["dataset_digest"] else " (the run trained on another digest)"
        gap = out.get("max_probability_difference")
        console.print(f"[red]served differs from logged{digest}[/]: {len(mismatched)} image(s) labelled otherwise"
                      + (f", e.g. {mismatched[0]}" if mismatched else "")
                      + (f"; probabilities up to {gap:.2g} apart (tolerance {PROBABILITY_TOLERANCE:g})"
                         if gap is not None and gap > PROBABILITY_TOLERANCE else ""))


# ------------------------------------------------------------------------------ CLI

def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="image files and/or directories (recursive)")
    parser.add_argument("--model", default=DEFAULT_URI,
                        help=f"model URI (default {DEFAULT_URI}); also models:/NAME/Production, "
                             "models:/NAME/<version>, runs:/<run_id>/classifier or runs:/<run_id>/model")
    parser.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    parser.add_argument("--evaluate", metavar="VERSION",
                        help="instead of files: predict every image of this dataset version's --split and compare with "
                             "the figures the model's run logged, image by image (exit 1 when they differ)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"),
                        help="with --evaluate (default test)")


def run(args) -> int:
    if args.evaluate:
        if args.inputs:
            raise ConfigError("--evaluate predicts a dataset version's split; pass no image files with it.")
        out = evaluate_served(args.model, args.evaluate, args.split, batch_size=args.batch_size)
        if args.json:
            sys.stdout.write(json.dumps(out) + "\n")
        else:
            print_evaluation(out)
        return 1 if out["equal"] is False else 0
    if not args.inputs:
        raise ConfigError("Pass image files or directories, or --evaluate VERSION.")
    files = collect(args.inputs)
    if not files:
        raise ConfigError(f"No image files under {', '.join(args.inputs)}.")
    model = load_model(args.model)
    result = predict_files(model, files, args.batch_size)
    if args.json:
        sys.stdout.write("".join(line + "\n" for line in json_lines(result)))
    else:
        print_table(result, args.model)
    failed = result["error"] != ""
    if failed.all():  # nothing was predicted: a script must not read this as success
        print(f"error: none of the {len(result)} file(s) could be predicted (first: {result['file'].iloc[0]}: "
              f"{result['error'].iloc[0]}); pass readable image files.", file=sys.stderr)
        return 1
    return 0
