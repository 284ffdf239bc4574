"""`python -m research data build|scan`: the embedded dataset builder and the inventory of a tree."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    build = sub.add_parser("build", help="build the embedded emoji20 dataset (20 classes, 7 styles + photos)",
                           description="Render the embedded dataset: <out>/<class>/*.png, labels.csv, ATTRIBUTION.md.")
    build.add_argument("--out", type=Path, default=Path("data/raw/emoji20"),
                       help="output folder (default: %(default)s); an earlier build there is replaced only if it "
                            "holds nothing the build did not write")
    build.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: %(default)s)")
    build.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    build.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                       help="only these classes (folder names, e.g. heart drink); default: all 20")
    build.add_argument("--limit-per-class", type=int, default=None, metavar="N",
                       help="only the first N emoji of each class, each in every style (a quick small build)")
    build.add_argument("--styles", nargs="+", default=None, metavar="STYLE",
                       help="only these drawing styles (default: all of openmoji twemoji noto fluent-flat fluent-hc "
                            "fxemoji streamline); another set of styles is another dataset, with its own digests")
    build.add_argument("--sources", type=Path, default=None,
                       help="where the npm styles' tarballs are cached (default: data/sources, or "
                            "$RESEARCH_SOURCES_DIR); npm fetches each once, later builds read the cache offline")

    scan = sub.add_parser("scan", help="inventory of a class-per-folder tree: format, mode, size, hash, readable?",
                          description="One row per file under DIR (class = first folder); never modifies DIR.")
    scan.add_argument("dir", type=Path, help="root of a class-per-folder tree")
    scan.add_argument("--out", type=Path, default=None,
                      help="write the inventory to this CSV (outside DIR; an existing file only if it is an inventory)")
    scan.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    scan.add_argument("--show-bad", type=int, default=20, metavar="N",
                      help="list up to N bad files (default: %(default)s)")


def run(args) -> int:
    return _build(args) if args.action == "build" else _scan(args)


def _build(args) -> int:
    from research.data.emoji import build_dataset, print_counts

    start = time.perf_counter()
    labels = build_dataset(args.out, seed=args.seed, workers=args.workers, classes=args.classes,
                           limit_per_class=args.limit_per_class, styles=args.styles, sources_dir=args.sources)
    print_counts(labels, title=f"{args.out}: {len(labels)} images in {time.perf_counter() - start:.1f} s")
    return 0


def _scan(args) -> int:
    from research.data import outputs
    from research.data.scan import COLUMNS, class_summary, inventory_digest, scan

    if args.out:
        outputs.check_file("scan", args.out, [args.dir], header=",".join(COLUMNS))
    with outputs.writing(args.out, "scan") if args.out else contextlib.nullcontext():
        start = time.perf_counter()
        df = scan(args.dir, workers=args.workers)
        seconds = time.perf_counter() - start
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            df.to_csv(args.out, index=False)
    _print_scan(df, class_summary(df), args, seconds, inventory_digest(df))
    return 0


def _print_scan(df, summary, args, seconds: float, digest: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log or a pipe: no reason to squeeze into 80 columns
        console = Console(width=160)
    table = Table(title=f"scan {args.dir}: {len(df)} files, {int(df['ok'].sum())} ok, "
                        f"{int((~df['ok']).sum())} bad ({seconds:.1f} s)")
    for col in summary.columns:
        table.add_column(col, justify="right" if col in ("files", "ok", "bad", "MB") else "left",
                         no_wrap=col in ("class", "median WxH", "range"))
    for row in summary.itertuples(index=False):
        table.add_row(*[str(v) for v in row])
    console.print(table)
    bad = df[~df["ok"]]
    if len(bad):
        shown = Table(title=f"bad files (first {min(args.show_bad, len(bad))} of {len(bad)})")
        shown.add_column("path")
        shown.add_column("error")
        for path, error in bad[["path", "error"]].head(args.show_bad).itertuples(index=False):
            shown.add_row(path, error)
        console.print(shown)
    rotated = df.attrs.get("exif_rotated", [])
    if rotated:
        console.print(f"{len(rotated)} EXIF-rotated image(s): width/height are as stored, e.g. {rotated[0]}")
    console.print(f"inventory digest {digest}" + (f"; written to {args.out}" if args.out else ""))
