"""Serving a trained model: what a consumer needs besides MLflow itself.

A model logged by research/train.py is a torch module plus `extra_files/model_meta.json`: the
class names, the preprocessing it was trained with (image size, mean/std, interpolation), and the
temperature fitted on val that calibrates its probabilities (logits / T before the softmax).
`Classifier` turns image bytes into class probabilities with exactly that preprocessing, through
the same `research.data.image.decode` and `normalize` that training uses. `IllustrationClassifier`
is the registered pyfunc around it: column `image` (base64 image bytes) in; `label`,
`probability`, `p_<class>` and `error` out, one row per image (a failed row's numbers are None).

`load_model(uri)` gives anything with `.predict(DataFrame)` for a registered version, an alias,
a stage, or a training run's torch model; `load_champion()` is `models:/illustration-classifier@champion`.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import json
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel  # the pyfunc's base class; the one heavy import a `--help` pays for

from research import tracking, verify
from research.data.image import IMAGENET_MEAN, IMAGENET_STD, decode, normalize
from research.errors import ConfigError, first_line

# Names users and scripts rely on; the registry module re-exports them.
MODEL_NAME = "illustration-classifier"
CHAMPION, PREVIOUS, STAGE = "champion", "previous", "Production"
META_FILE = "model_meta.json"  # logged as an extra file of the torch model, so it travels with the weights
CHUNK = 64  # images per forward pass
_loading: contextvars.ContextVar[str | None] = contextvars.ContextVar("loading_model", default=None)  # its name


# ------------------------------------------------------------------------------ model metadata

def model_meta(*, classes, image_size: int, mean, std, interpolation: str, model: str, dataset_version: str,
               dataset_digest: str, channels_last: bool, **extra) -> dict[str, Any]:
    """What a consumer of the model needs besides its weights: class names and the preprocessing, as a plain dict."""
    meta = {
        "classes": [str(c) for c in classes], "image_size": int(image_size),
        "mean": [float(v) for v in mean], "std": [float(v) for v in std], "interpolation": interpolation,
        "resize": f"RGB (alpha on white, EXIF transposed), squashed to image_size x image_size, {interpolation}",
        "model": model, "dataset_version": dataset_version, "dataset_digest": dataset_digest,
        "channels_last": bool(channels_last),
    }
    check_meta(meta | extra)
    return meta | extra


def check_meta(meta: dict[str, Any], where: str = "this model", module=None) -> dict[str, Any]:
    """Refuse preprocessing this code cannot reproduce, naming the model and the bad value (not one error per
    image later): the rules of research/verify.py."""
    return verify.model_meta(meta, where, module)


def read_meta(model_dir: str | Path, where: str | None = None) -> dict[str, Any]:
    """`<model_dir>/extra_files/model_meta.json`; models logged before it had them get bicubic and ImageNet mean/std."""
    where = where or _loading.get() or str(model_dir)
    path = Path(model_dir) / "extra_files" / META_FILE
    if not path.is_file():
        raise ConfigError(f"{where} has no extra_files/{META_FILE}: it is not a model logged by research/train.py.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: {META_FILE} is not valid JSON ({str(exc)[:80]}); register the model again from "
                          "its run (python -m research promote --run RUN_ID --force), or restore the file.") from None
    if isinstance(meta, dict):
        meta.setdefault("interpolation", "bicubic")
        meta.setdefault("mean", list(IMAGENET_MEAN))
        meta.setdefault("std", list(IMAGENET_STD))
    return meta


def pip_requirements() -> list[str]:
    """Pinned requirements of a logged model: what the serving side imports, at this machine's versions."""
    from importlib.metadata import version as v

    reqs = [f"torch=={v('torch').split('+')[0]}", f"torchvision=={v('torchvision').split('+')[0]}",
            f"pillow=={v('pillow')}", f"pandas=={v('pandas')}", f"numpy=={v('numpy')}", f"mlflow=={v('mlflow')}"]
    try:
        reqs.append(f"timm=={v('timm')}")
    except Exception:  # timm is optional: only timm:<name> models need it
        pass
    return reqs


# ------------------------------------------------------------------------------ the classifier

def prob_column(cls: str) -> str:
    return f"p_{cls}"


def decode_payload(value: Any) -> bytes:
    """A cell of the `image` column -> image bytes: base64 text (the interface) or raw bytes.

    Whitespace anywhere is dropped first: `base64` and MIME encoders wrap lines at 76 columns (\\n or \\r\\n).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"expected base64 text, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64: {exc}") from exc


def row_error(exc: Exception) -> str:
    """`UnidentifiedImageError: cannot identify image file` without the BytesIO object's address."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Classifier:
    """A torch module + its model_meta.json: image bytes in, class probabilities out.

    Pixels go through `research.data.image.decode` (the meta's image_size and interpolation) and
    `normalize` (the meta's mean/std), the functions training itself uses, so both see the same numbers.
    """

    def __init__(self, module, meta: dict[str, Any], device: str | None = None):
        import torch  # heavy; only a loaded model needs it

        check_meta(meta, _loading.get() or "this model", module)
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.size = int(meta["image_size"])
        self.interpolation: str = meta["interpolation"]
        self.mean = tuple(float(v) for v in meta["mean"])
        self.std = tuple(float(v) for v in meta["std"])
        self.temperature = float(meta.get("temperature", 1.0))  # fitted on val by training; 1: the raw softmax
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.module = module.to(self.device).eval()

    def pixels(self, data: bytes) -> np.ndarray:
        """uint8 [S, S, 3] under the training decode rule."""
        return decode(data, self.size, self.interpolation)

    def tensor(self, arrays: list[np.ndarray]):
        """uint8 [S, S, 3] list -> normalised float32 [B, 3, S, S] on the device (as training's eval batches)."""
        import torch

        x = torch.from_numpy(np.stack(arrays)).to(self.device).permute(0, 3, 1, 2)
        return normalize(x, self.mean, self.std).contiguous()

    def probabilities(self, arrays: list[np.ndarray]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(arrays), CHUNK):
                logits = self.module(self.tensor(arrays[start : start + CHUNK]))
                out.append(torch.softmax(logits.float() / self.temperature, dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """DataFrame with column `image` -> label, probability, p_<class>..., error: one row per image.

        A cell holding a list is that many images (MLflow turns `{'image': [b64, ...]}` into one such row).
        A failed row's probability and p_<class> are None, which MLflow's scoring server writes as JSON null
        (NaN would be written as a bare `NaN`, which is not JSON): those columns are then of object dtype,
        and float64 when every row was read.
        """
        if "image" not in frame.columns:
            raise ValueError("input needs a column 'image' of base64-encoded image bytes; "
                             f"got columns {list(frame.columns)}")
        arrays, ok, errors = [], [], []
        for value in images_of(frame["image"]):
            try:
                arrays.append(self.pixels(decode_payload(value)))
                ok.append(True)
                errors.append("")
            except Exception as exc:  # one unreadable image is that row's error, not the batch's
                ok.append(False)
                errors.append(row_error(exc))
        ok = np.array(ok, dtype=bool)
        probs = np.zeros((len(ok), len(self.classes)), dtype=np.float64)
        if arrays:
            probs[ok] = self.probabilities(arrays)
        best = probs.argmax(1)
        out = pd.DataFrame({"label": [self.classes[i] if good else "" for i, good in zip(best, ok)],
                            "probability": probs[np.arange(len(ok)), best]})
        for j, cls in enumerate(self.classes):
            out[prob_column(cls)] = probs[:, j]
        out["error"] = errors
        if not ok.all():
            numeric = ["probability", *map(prob_column, self.classes)]
            out[numeric] = out[numeric].astype(object)
            out.loc[~ok, numeric] = None
        return out


def served_probabilities(classifier: Classifier, paths: list[Path]) -> np.ndarray:
    """[N, C] class probabilities of image files through the pyfunc's own path (file bytes -> predict_frame),
    CHUNK files per call. A run measures its logged test figures this way, so its registered model reproduces
    them image for image; a file that does not decode is an error here (a dataset version holds none)."""
    out = []
    columns = [prob_column(c) for c in classifier.classes]
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start:start + CHUNK]
        frame = classifier.predict_frame(pd.DataFrame({"image": [Path(p).read_bytes() for p in chunk]}))
        failed = [f"{p}: {e}" for p, e in zip(chunk, frame["error"]) if e]
        if failed:
            raise ConfigError(f"{len(failed)} image(s) of the dataset version do not decode, e.g. {failed[0]}; "
                              "rebuild the version with `python -m research split`.")
        out.append(frame[columns].to_numpy(np.float64))
    return np.concatenate(out) if out else np.zeros((0, len(columns)))


def images_of(column: pd.Series) -> list[Any]:
    """The `image` column's cells in order, a list-like cell taken as that many images."""
    return [v for cell in column.tolist() for v in (cell if isinstance(cell, (list, tuple, np.ndarray)) else [cell])]


def classifier_from_torch_dir(model_dir: str | Path, device: str | None = None) -> Classifier:
    """A Classifier from a local copy of a training run's torch model (`runs:/<id>/model`)."""
    import mlflow.pytorch
    import torch

    map_location = None if torch.cuda.is_available() else "cpu"  # a GPU-trained pickle on a CPU box
    verify.model_files(model_dir, _loading.get() or str(model_dir))
    module = mlflow.pytorch.load_model(str(model_dir), map_location=map_location)
    return Classifier(module, read_meta(model_dir), device)


class IllustrationClassifier(PythonModel):
    """The registered pyfunc: column `image` (base64 image bytes) -> label, probability, p_<class>, error."""

    def load_context(self, context) -> None:
        self.classifier = classifier_from_torch_dir(context.artifacts["torch_model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        return self.classifier.predict_frame(model_input)


# ------------------------------------------------------------------------------ loading

def load_model(uri: str):
    """Anything with `.predict(DataFrame)` for a model URI.

    `models:/NAME@alias`, `models:/NAME/Production`, `models:/NAME/<version>`, `runs:/<id>/classifier`
    load the registered pyfunc; a training run's torch model (`runs:/<id>/model`) is wrapped in
    the same Classifier, so both give the same columns.
    """
    import mlflow

    tracking.setup()
    tracking.check_reachable()
    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as exc:
        raise ConfigError(f"Cannot find model {uri!r} ({first_line(exc)}). Promote one first with "
                          f"`python -m research promote`, or list versions in `python -m research ui`.") from exc
    loader = info.flavors.get("python_function", {}).get("loader_module")
    where = f"model {uri}" + (f" (run {info.run_id})" if getattr(info, "run_id", None) else "")
    token = _loading.set(where)  # a damaged model's error names it, not the temporary folder it was loaded from
    # the download goes to a folder removed once the model is in memory: MLflow's own default is a new temp
    # folder per load that nobody removes (a copy of the weights in /tmp for every `predict`)
    try:
        with tempfile.TemporaryDirectory(prefix="research-model-") as tmp:
            if "pytorch" in info.flavors and loader == "mlflow.pytorch":
                local = mlflow.artifacts.download_artifacts(uri, dst_path=tmp)
                return ClassifierModel(classifier_from_torch_dir(local))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # stage URIs warn; they still resolve
                return mlflow.pyfunc.load_model(uri, dst_path=tmp)
    except ConfigError:
        raise
    except Exception as exc:  # a file of the model missing or unreadable: name the model, not /tmp
        text = first_line(exc).replace(tmp, "<model>") if "tmp" in locals() else first_line(exc)
        raise ConfigError(f"{where} cannot be loaded: {type(exc).__name__}: {text}. A file of it is missing or "
                          "damaged in the artifact store; register it again from its run (python -m research promote "
                          "--run RUN_ID --force), or promote another run.") from exc
    finally:
        _loading.reset(token)


def load_champion(name: str = MODEL_NAME, alias: str = CHAMPION):
    return load_model(f"models:/{name}@{alias}")


class ClassifierModel:
    """A bare torch model's Classifier behind the pyfunc's `.predict(frame)`."""

    def __init__(self, classifier: Classifier):
        self.classifier = classifier

    def predict(self, frame: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(frame, pd.DataFrame):
            frame = pd.DataFrame(frame)
        return self.classifier.predict_frame(frame)


# ------------------------------------------------------------------------------ the run's model as a pyfunc

def signature(classes: list[str]):
    """The pyfunc's interface: column `image` in; label, probability, p_<class>, error out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("string", "label"), ColSpec("double", "probability")]
    outputs += [ColSpec("double", prob_column(c)) for c in classes]
    outputs.append(ColSpec("string", "error"))
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]), outputs=Schema(outputs))


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> ClassifierModel:
    """MLflow's pyfunc loader for a training run's model (research/runlog.py points its python_function
    flavor here): `data_path` is the model's `data/` folder; the model folder around it is also a
    plain `mlflow.pytorch` model, so the same weights serve prediction and fine-tuning."""
    return ClassifierModel(classifier_from_torch_dir(Path(data_path).parent))
