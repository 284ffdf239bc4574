"""`python -m research <command>`: argument parsing only; each command lives in its stage module.

A stage module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are imported
only when their command runs, so `--help` is instant and a command pays only for what it uses.
`-v/--verbose` may stand anywhere on the line; research/logs.py says what it shows.

`main` is the one error boundary: a failure the user can fix (research/errors.py says which) prints one
`error:` line and exits 2, its traceback kept in the command's log file; any other exception is a bug and
shows its traceback (exit 1). Either way the log file's path is printed when there is one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from research import errors, logs, tracking

# command -> (module, one-line help). The order is the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("research.data.cli", "build the embedded dataset (data build) or inventory a tree (data scan)"),
    "eda": ("research.eda", "plots and summary of a class-per-folder tree, logged to MLflow"),
    "clean": ("research.data.clean", "find wrongly collected photographs; write manifest + quarantine"),
    "split": ("research.data.split", "group-aware train/val/test split into a dataset version"),
    "weights": ("research.weights", "fetch a model's ImageNet weights into the local cache (a box with internet)"),
    "train": ("research.train_cli", "train one model; every epoch logged to MLflow"),
    "sweep": ("research.sweep", "an Optuna study: one MLflow parent run, a child run per trial"),
    "promote": ("research.registry", "register the best run as the champion model version"),
    "predict": ("research.predict", "classify images with a registered model"),
    "runs": ("research.runs", "leaderboard of runs in the terminal"),
    "ui": ("research.runs", "start the MLflow UI on the tracking store"),
    "report": ("research.report",
               "a study's champion vs a baseline: val/test F1, per-class F1, importances, confusion matrix"),
    "styles": ("research.styles", "leave one style out: train a recipe once per held-out drawing style"),
    "gc": ("research.artifacts", "show (and with --yes free) weights outside the keep rules and deleted runs' files"),
    "demo": ("research.demo", "the whole pipeline end to end on the embedded dataset"),
}
# the commands that open the tracking store every time they run: the boundary asks a tracking server before their
# module is imported (seconds of torch and MLflow), so a server that is down is one error line within a second
USES_TRACKING = {"train", "sweep", "promote", "predict", "runs", "report", "styles", "gc"}
VERBOSE_HELP = ("anywhere on the line: show third-party INFO lines and library warnings on the terminal "
                "(they always go to mlruns/logs/<command>-<time>-<pid>.log)")


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m research",
        description="Illustration classifier: scan, eda, clean, split, train, sweep, promote, predict.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def _verbose(argv: list[str]) -> tuple[bool, list[str]]:
    """-v/--verbose from anywhere on the line (before or after the command, or after a `data` action)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # `--ver` stays split's `--version`
    parser.add_argument("-v", "--verbose", action="store_true")
    known, rest = parser.parse_known_args(argv)
    return known.verbose, rest


def main(argv: list[str] | None = None) -> int:
    verbose, argv = _verbose(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)  # --help, or an error naming the valid commands
        return 2
    name, rest = argv[0], argv[1:]
    if name in USES_TRACKING and not {"-h", "--help"} & set(rest):
        with logs.to_file(name, verbose) as log:
            try:
                tracking.check_reachable()
            except errors.TrackingError as exc:
                return _report(exc, log)
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"python -m research {name}", description=COMMANDS[name][1])
    module.add_arguments(parser, name) if _takes_name(module) else module.add_arguments(parser)
    args = parser.parse_args(rest)
    args.command = name
    with logs.to_file(name, verbose) as log:
        try:
            return int(module.run(args) or 0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            return _report(exc, log)


def _report(exc: Exception, log: Path) -> int:
    """One `error:` line (exit 2) for a failure the user can fix, its traceback in the log file only; the
    traceback on the terminal (exit 1) for anything else."""
    logger = logging.getLogger("research")
    message = errors.user_message(exc)
    logs.point(log)
    if message is None:
        logger.error("unexpected error (not a failure research/errors.py knows)", exc_info=exc)
        return 1
    print(f"error: {message}", file=sys.stderr)
    # the traceback, at INFO: to the file (the terminal shows it only with -v). Our own errors say all in their
    # message: a command stopped by one before it wrote anything (a dead tracking server) leaves no file behind
    if not isinstance(exc, (errors.ConfigError, errors.TrackingError)) or log.exists():
        logger.info("error: %s", message, exc_info=exc)
    return 2


def _takes_name(module) -> bool:
    """A module serving several commands (runs/ui) takes the command name too."""
    return module.add_arguments.__code__.co_argcount == 2
