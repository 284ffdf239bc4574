"""Output in a log file reads well (issue 26, item 7): a stage's progress becomes one line in the log, not a bar
squeezed into 80 columns (`17… 0… 0:0…`) or an empty line; the report's tables never cut a value to `…`."""

from __future__ import annotations

from rich.console import Console

from research import report
from tests.reliability import cli_env, run_cli


def test_a_stage_in_a_log_file_prints_one_line_when_done_and_no_squeezed_bar(tmp_path):
    env = cli_env()
    env.pop("COLUMNS")  # a plain `make demo > demo.log`: rich falls back to 80 columns
    label = "emoji20-with-a-rather-long-folder-name-for-a-log"
    out, _ = run_cli("data", "build", "--out", tmp_path / label, "--classes", "heart", "--limit-per-class", "1",
                     "--workers", "1", "--styles", "openmoji", "twemoji", "noto", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(f"build {label}: ")]
    assert len(lines) == 1 and " in " in lines[0] and lines[0].split(": ")[1].split(" ")[0] == "4/4", out.stdout
    assert "…" not in out.stdout + out.stderr and "━" not in out.stderr  # (the counts table draws with ━)
    title = next(line for line in out.stdout.splitlines() if "4 images in" in line)
    assert title.startswith(str(tmp_path / label)), out.stdout  # the path on one line, not wrapped at 80


def test_the_report_in_a_narrow_terminal_wraps_a_value_and_never_cuts_it(monkeypatch):
    console = Console(width=60, force_terminal=True, color_system=None, record=True)
    monkeypatch.setattr(report, "console", console)
    run_id, model = "0123456789abcdef0123456789abcdef", "tf_efficientnet_lite0_with_a_long_name"
    report.to_console("study", [report.Section("Champion vs baseline", ["", "champion (trial 3)", "seed_recipe"],
                                               [["run id", run_id, run_id[::-1]], ["model *", model, "vgg16_v2"]])])
    text = console.export_text()
    assert "…" not in text
    cells = "".join(part.strip() for line in text.splitlines() for part in line.split("│")[2:3])
    assert run_id in cells and model in cells  # folded over lines, but whole
