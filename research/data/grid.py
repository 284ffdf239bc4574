"""A labelled grid of thumbnails, one row per (label, paths): EDA's samples and the cleansing's clusters.

Each file is read by the one decode rule (research/data/image.py), so a grid shows what every stage reads. Like
that rule it imports nothing else of the project, so every stage may import it.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from research.data.image import open_rgb


def _thumb(path: Path, cell: int) -> Image.Image:
    """A cell x cell thumbnail on white (transparency flattened); a grey X for an unreadable file."""
    canvas = Image.new("RGB", (cell, cell), "white")
    try:
        img = open_rgb(path)
        img.thumbnail((cell, cell), Image.BILINEAR)
        canvas.paste(img, ((cell - img.width) // 2, (cell - img.height) // 2))
    except Exception:
        d = ImageDraw.Draw(canvas)
        d.line((0, 0, cell, cell), fill="grey", width=2)
        d.line((0, cell, cell, 0), fill="grey", width=2)
    return canvas


def image_grid(rows: list[tuple[str, list[Path]]], cols: int = 10, cell: int = 64, label_w: int = 0,
               pad: int = 2) -> Image.Image:
    """One row of thumbnails per (label, paths); the label above (or left of, with label_w) each row."""
    font = ImageFont.load_default(size=12) if hasattr(ImageFont, "load_default") else None
    head = 0 if label_w else 16
    lines = [max(1, -(-len(p) // cols)) for _, p in rows]
    height = sum(head + n * (cell + pad) for n in lines) + pad
    width = label_w + cols * (cell + pad) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    y = pad
    for (label, paths), n in zip(rows, lines):
        if label_w:
            draw.text((pad, y + cell // 2 - 6), label, fill="black", font=font)
        else:
            draw.text((pad, y), label, fill="black", font=font)
        y += head
        for i, p in enumerate(paths):
            r, c = divmod(i, cols)
            grid.paste(_thumb(Path(p), cell), (label_w + pad + c * (cell + pad), y + r * (cell + pad)))
        y += n * (cell + pad)
    return grid
