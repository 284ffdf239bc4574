"""Drawing styles that arrive as npm package tarballs: pinned, digest-checked, cached under data/sources/.

`npm pack NAME@VERSION` fetches a package's tarball from the registry npm is configured for and runs no
package code (`--ignore-scripts` says so twice). The tarball's sha256 must be the pinned one, or nothing of it
is used. A tarball already in the cache with the pinned digest is read as it is, so a second build is offline;
a cached file with another digest (a cut download, an edit) is fetched again.

Each package is an Iconify JSON icon set: `package/icons.json` holds the SVG bodies (`width`/`height` per icon
or per set, 16 when neither says), and most sets have `package/chars.json`, lower-case hex codepoints joined by
'-' -> icon name. Sets without one are matched by name (`IconSet.find`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import unicodedata
from functools import lru_cache
from pathlib import Path

from research.data import outputs
from research.errors import ConfigError


def default_cache() -> Path:
    """data/sources under the working directory, or $RESEARCH_SOURCES_DIR (one cache for many checkouts)."""
    return Path(os.environ.get("RESEARCH_SOURCES_DIR") or "data/sources")


@dataclasses.dataclass(frozen=True)
class Package:
    """One pinned npm package: name, exact version and the sha256 of its tarball."""

    name: str
    version: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball(self) -> str:
        """The file name `npm pack` gives it: '@scope/name' -> 'scope-name-VERSION.tgz'."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(package: Package, cache: str | Path | None = None) -> Path:
    """The package's tarball in `cache` (default `default_cache()`), fetched with `npm pack` when it is not there
    with the pinned digest."""
    cache = Path(cache) if cache is not None else default_cache()
    if cache.is_dir() and outputs.stage_of(cache) is None and all(p.suffix == ".tgz" for p in cache.iterdir()):
        outputs.mark(cache, "sources")  # tarballs copied in by hand, as the npm-less error says: the cache
    outputs.check_folder("sources", cache)
    outputs.mark(cache, "sources")
    target = outputs.output_path(cache, package.tarball)
    with outputs.writing(cache, "sources", wait=True):  # two builds at once: one fetches, the other finds it cached
        if target.is_file() and _sha256(target) == package.sha256:
            return target
        npm = shutil.which("npm")
        if npm is None:
            raise ConfigError(f"the drawing style from {package.spec} needs npm to fetch it once (then {cache} "
                              "keeps it): install Node.js with npm (Debian: apt-get install npm), or copy its "
                              f"tarball {package.tarball} into {cache}, or build without it (data build --styles ...)")
        with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
            done = subprocess.run([npm, "pack", package.spec, "--pack-destination", tmp, "--ignore-scripts",
                                   "--silent"], capture_output=True, text=True, timeout=600)
            got = Path(tmp) / package.tarball
            if done.returncode != 0 or not got.is_file():
                why = (done.stderr.strip().splitlines() or ["no tarball written"])[-1]
                raise ConfigError(f"npm pack {package.spec} failed ({why[:200]}); check that npm reaches its "
                                  f"registry (npm ping), or copy {package.tarball} into {cache}.")
            digest = _sha256(got)
            if digest != package.sha256:
                raise ConfigError(f"{package.spec}: the fetched tarball's sha256 is {digest}, not the pinned "
                                  f"{package.sha256}; nothing of it is used. The registry served other bytes for "
                                  "this version: report it, or pin the new digest in research/data/emoji.py after "
                                  "checking the package.")
            os.replace(got, target)
    return target


@dataclasses.dataclass(frozen=True)
class IconSet:
    """An Iconify JSON set read from its tarball: SVG bodies by name, and codepoints -> name when it has them."""

    icons: dict[str, dict]
    chars: dict[str, str]
    width: int
    height: int

    def find(self, emoji: str, name: str) -> str:
        """The icon drawing `emoji` (codepoints 'XXXX-XXXX', CLDR name `name`), or '' when the set has none.

        With chars.json: the codepoints, else without FE0F. Without: the names that sets use, squashed
        ('redheart', Mozilla's) or hyphenated ('red-heart', '-1' for the first of several drawings, Streamline's),
        tried as the CLDR name, the Unicode character name (single code points), each also without 'face'.
        """
        full = emoji.lower()
        bare = "-".join(c for c in full.split("-") if c != "fe0f")
        for key in (full, bare):
            if self.chars.get(key) in self.icons:
                return self.chars[key]
        if self.chars:
            return ""
        names = [name.lower()]
        points = bare.split("-")
        if len(points) == 1:
            names.append(unicodedata.name(chr(int(points[0], 16)), "").lower())
        names += [n.replace(" face", "").replace("face with ", "") for n in names]
        for n in filter(None, names):
            squashed, hyphened = re.sub(r"[^a-z0-9]", "", n), re.sub(r"[^a-z0-9]+", "-", n).strip("-")
            for key in (squashed, hyphened, hyphened + "-1", hyphened + "-face", hyphened + "-face-1"):
                if key in self.icons:
                    return key
        return ""

    def svg(self, icon: str, ink: str | None = None) -> str:
        """The icon as a standalone SVG document; `ink` replaces `currentColor` (monochrome sets draw with it)."""
        data = self.icons[icon]
        w, h = data.get("width", self.width), data.get("height", self.height)
        left, top = data.get("left", 0), data.get("top", 0)
        body = data["body"] if ink is None else data["body"].replace("currentColor", ink)
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
                f'viewBox="{left} {top} {w} {h}">{body}</svg>')


@lru_cache(maxsize=8)
def icon_set(tarball: str) -> IconSet:
    """Read once per process (a build's workers each read the sets they render)."""
    with tarfile.open(tarball, "r:gz") as tar:
        def member(name: str) -> dict:
            try:
                f = tar.extractfile(f"package/{name}")
            except KeyError:
                return {}
            return json.load(f) if f else {}

        icons, chars = member("icons.json"), member("chars.json")
    if not icons.get("icons"):
        raise ConfigError(f"{tarball} holds no Iconify icons.json; delete it and rebuild (it is fetched again).")
    return IconSet({k: v for k, v in icons["icons"].items() if not v.get("hidden")}, chars,
                   int(icons.get("width", 16)), int(icons.get("height", 16)))


__all__ = ["default_cache", "Package", "IconSet", "fetch", "icon_set"]
