"""`python -m research demo`: the whole pipeline on the embedded dataset, sized for a laptop CPU.

build -> scan -> eda -> clean (auto) -> split (v3) -> sweep (sweeps/demo.yaml) -> promote -> predict.
Every stage reuses what an earlier run left (and says so): the dataset, the clean dir and the
version are kept when present; the study resumes (a finished one only re-summarises); promoting
the same champion again changes nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from research import tracking

console = Console()
RAW = Path("data/raw/emoji20")
CLEAN = Path("data/clean/emoji20")
VERSIONS = Path("data/versions")
EDA = Path("reports/eda/emoji20")
SPEC = Path(__file__).resolve().parent.parent / "sweeps" / "demo.yaml"


def step(name: str) -> None:
    console.rule(f"[bold]{name}")


def demo(workers: int | None = None, spec_path: Path = SPEC, predict_n: int = 12) -> dict:
    from research.data.clean import clean
    from research.data.emoji import build_dataset
    from research.data.split import build_version
    from research.eda import run_eda
    from research.predict import predict_files
    from research.serving import load_model
    from research.sweep import load_spec, sweep

    t0, timings, notes = time.perf_counter(), {}, {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - start
        return out

    step("1/7 dataset")
    if (RAW / "labels.csv").is_file():
        console.print(f"reusing {RAW} (delete it to rebuild)")
    else:
        timed("build", lambda: build_dataset(RAW, seed=0, workers=workers))

    step("2/7 scan + eda")
    if (EDA / "summary.json").is_file():
        console.print(f"reusing {EDA}")
    else:
        timed("eda", lambda: run_eda(RAW, EDA, workers=workers))

    step("3/7 clean")
    if (CLEAN / "clean.json").is_file():
        console.print(f"reusing {CLEAN}")
        import json

        cleaned = json.loads((CLEAN / "clean.json").read_text())
    else:
        cleaned = timed("clean", lambda: clean(RAW, method="auto", out=CLEAN, workers=workers))
    notes["photo_f1"] = (cleaned.get("metrics") or {}).get("f1")

    step("4/7 split v3")
    version_dir = VERSIONS / "v3"
    if (version_dir / "version.json").is_file():
        console.print(f"reusing {version_dir}")
    else:
        timed("split", lambda: build_version(CLEAN, "v3", out_root=VERSIONS, workers=workers))

    step("5/7 sweep")
    spec = load_spec(spec_path)
    summary = timed("sweep", lambda: sweep(spec, spec_path=str(spec_path)))

    step("6/7 promote")
    promotion, kept = timed("promote", lambda: promote_or_keep(spec.study_name))
    console.print(f"champion: {promotion.uri} = version {promotion.version} (run {promotion.run_id})"
                  + ("  [dim](already champion)" if promotion.already_champion and not kept else ""), soft_wrap=True)

    step("7/7 predict")
    from research.data.versions import load_version

    test = load_version("v3", VERSIONS).split_frame("test")
    # a seeded random sample: every class, artist and style as often as the test split holds them
    sample = test.sample(n=min(predict_n, len(test)), random_state=0)
    files = [Path(f) for f in sample["file"]]
    model = load_model(promotion.uri)
    preds = predict_files(model, files)
    preds.insert(1, "true", list(sample["class"]))
    table = Table(title=f"{promotion.uri} on {len(files)} test images")
    for col in ("file", "true", "label", "probability"):
        table.add_column(col)
    for _, row in preds.iterrows():
        table.add_row(Path(row["file"]).name, row["true"], row["label"],
                      "" if row["error"] else f"{row['probability']:.2f}")
    console.print(table)

    total = time.perf_counter() - t0
    right = int((preds["label"] == preds["true"]).sum())
    rows = summary_rows(cleaned, notes, spec, summary, promotion, right, len(preds), version_dir, total, timings)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()  # a long value wraps inside its own column, under its label's neighbour
    for label, text in rows:
        grid.add_row(label, text)
    console.print(Panel(grid, title="demo summary"))
    return {"seconds": total, "timings": timings, "study": summary, "promotion": promotion, "predictions": preds}


def promote_or_keep(study: str):
    """(the champion, whether it was kept): the study's best run promoted, or, when the gate refuses it, the
    registry's champion kept with one line saying why (it scores better on val, or was chosen on other data or
    another metric). A second demo never fails because a champion is there."""
    from research.registry import PromotionRefused, champion_promotion, promote

    try:
        return promote(study=study), False
    except PromotionRefused as refused:
        champ, cand = refused.champion, refused.candidate
        if champ is None or cand is None:
            raise
        ours = f"this study's best {cand.metric} {_short(cand.score)} ({cand.where})"
        theirs = f"{champ.metric} {_short(champ.score)} ({champ.where})"
        if refused.comparable:
            console.print(f"kept the registry's champion: its {theirs} beats {ours}", soft_wrap=True)
        else:
            console.print(f"kept the registry's champion, chosen on another dataset or metric: its {theirs} and {ours} "
                          f"are not comparable; `python -m research promote --study {study} --force` would replace it",
                          soft_wrap=True)
        return champion_promotion(champ, cand.metric), True


def summary_rows(cleaned, notes, spec, summary, promotion, right, shown, version_dir, total,
                 timings) -> list[tuple[str, str]]:
    """The demo's outcome in words, as (label, text) rows: rounded numbers, what to run next."""
    counts = ", ".join(f"{n} {state.lower()}" for state, n in summary["counts"].items() if n)
    params = ", ".join(f"{k}={_short(v)}" for k, v in (summary.get("best_params") or {}).items())
    photo_f1 = notes["photo_f1"]
    test_f1 = promotion.test_f1
    rows = [
        ("photo detection", f"F1 {photo_f1:.3f} ({cleaned.get('method')}, {cleaned.get('features')} features)"
         if photo_f1 is not None else "n/a"),
        ("study", f"{spec.study_name}: {counts}"),
        ("best trial", f"#{summary.get('best_trial')}, val macro F1 {summary.get('best_value', float('nan')):.3f}"),
        ("", params),
        ("champion", f"{promotion.uri}, version {promotion.version}"),
        ("", f"best {promotion.metric} {_short(promotion.score)} (chose it), test macro F1 "
             + (f"{test_f1:.3f}" if test_f1 is not None else "n/a") + " (reports it)"),
        ("sample predictions", f"{right} of {shown} right (a random sample of the test split)"),
        ("artifacts", storage_text(summary)),
        ("data", f"{RAW}/, {CLEAN}/, {version_dir}/"),
        ("eda", f"{EDA}/"),
        ("tracking", tracking.tracking_uri()),
        ("wall time", f"{total:.0f} s"),
        ("", ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())),
        ("next", "python -m research ui"),
        ("", "python -m research predict data/versions/v3/test/heart"),
        ("", "python -m research sweep sweeps/transfer_cpu.yaml"),
    ]
    return rows


def storage_text(summary: dict) -> str:
    """The study's artifact bytes: in all, and the weights of the trials that keep them."""
    import mlflow

    from research.artifacts import human, study_bytes

    parent = summary.get("parent_run_id")
    if not parent:
        return "n/a"
    b = study_bytes(mlflow.MlflowClient(), parent)
    each = f", {human(b['weights'] / b['kept'])} each" if b["kept"] else ""
    return (f"{human(b['total'])} for {b['runs']} trials: weights of {b['kept']} kept trials{each}, "
            f"{human(b['total'] - b['weights'])} of reports and metrics")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def add_arguments(parser) -> None:
    parser.add_argument("--workers", type=int, help="processes for build/scan/clean (default: all cores)")
    parser.add_argument("--spec", type=Path, default=SPEC, help="the sweep spec (default sweeps/demo.yaml)")


def run(args) -> int:
    demo(workers=args.workers, spec_path=args.spec)
    return 0
