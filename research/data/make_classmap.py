"""Regenerate emoji20.csv (the shipped class map) from Unicode's emoji-test.txt.

    python -m research.data.make_classmap path/to/emoji-test.txt

Run once by a maintainer; the builder reads only the shipped CSV, never emoji-test.txt.
Keeps every fully-qualified emoji of the 20 subgroups below, skin-tone variants excluded.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

# The 20 classes (Unicode Emoji 15.0 subgroups), largest first.
SUBGROUPS = [
    "animal-mammal", "transport-ground", "sky & weather", "clothing", "food-prepared", "time",
    "place-building", "sport", "face-concerned", "heart", "tool", "animal-bird", "drink",
    "food-fruit", "food-vegetable", "animal-bug", "transport-air", "animal-marine",
    "musical-instrument", "animal-reptile",
]
SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*(\S+)\s+E(\d+\.\d+)\s+(.*)$")


def folder_name(subgroup: str) -> str:
    """'sky & weather' -> 'sky-weather': safe on every filesystem and in a shell."""
    return re.sub(r"[^a-z0-9]+", "-", subgroup.lower()).strip("-")


def parse(text: str) -> list[dict]:
    rows, group, subgroup = [], "", ""
    for line in text.splitlines():
        if line.startswith("# group: "):
            group = line[len("# group: "):].strip()
        elif line.startswith("# subgroup: "):
            subgroup = line[len("# subgroup: "):].strip()
        elif subgroup in SUBGROUPS and (m := LINE.match(line)):
            codepoints = m.group(1).split()
            if SKIN_TONES & set(codepoints):
                continue
            rows.append({"class": folder_name(subgroup), "subgroup": subgroup, "group": group,
                         "codepoints": " ".join(codepoints), "emoji": m.group(2),
                         "version": m.group(3), "name": m.group(4)})
    return rows


def main(argv: list[str]) -> int:
    source = Path(argv[0])
    rows = parse(source.read_text(encoding="utf-8"))
    out = Path(__file__).with_name("emoji20.csv")
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    found = {r["class"] for r in rows}
    missing = [s for s in SUBGROUPS if folder_name(s) not in found]
    if missing:
        print(f"subgroups not found in {source}: {missing}", file=sys.stderr)
        return 1
    print(f"wrote {len(rows)} emoji in {len(found)} classes to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
