"""Distillation: a registered model teaches the student on the student's own augmented views (`teacher:`).

`teacher: models:/NAME@ALIAS` (or models:/NAME/VERSION) joins any route that can show the teacher the student's
view: the student's loss becomes (1 - distill_weight) x its label loss + distill_weight x T^2 x KL(teacher_T ||
student_T), T = distill_temperature (Hinton et al. 2015), on the same augmented view (Beyer et al. 2022: a
consistent teacher). The teacher's logits are those it serves (its module's output over its calibration
temperature, from its model_meta.json), so its probabilities at T = 1 are what `predict` gives.

- The alias is pinned when the run resolves its config: `teacher` becomes models:/NAME/VERSION (a moving alias,
  a resumed run and a study's later trials keep the teacher they started with); the URI as given, the version,
  its run id, dataset digest and model are params `teacher.*` and the tag `distilled_from`.
- Stored views (loader=features): the teacher runs once over every stored training view (the plain one and the
  `feature_views` augmented ones, replaying the parameters they were drawn with) and its logits are stored under
  data/cache/teacher/; each batch takes the rows of the views the student got.
- Views drawn per epoch (loader=cached): the teacher runs on each batch, on the same crop, flip, rotation, colour
  and mixup as the student, at its own resolution (the crop box scaled to its size, from its own decoded store)
  and with its own normalisation. An epoch's views depend on the data, seed, sampler, batch size and
  augmentation alone, so the teacher's logits on them are kept per epoch under data/cache/teacher/ and every
  later run drawing the same views (a study's trials over lr, schedule, weight, temperature) reads them back.
  loader=folder draws per-image transforms the teacher cannot replay: refused.
- The teacher sees training images only, never val or test; a teacher trained on another dataset digest than the
  student's is refused: its training images could be the student's val or test images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from research.config import TrainConfig
from research.errors import ConfigError
from research.inputs import decoded
from research.inputs.features import EMBED_BATCH, weights_digest
from research.inputs.loaders import Batch, BatchAugment, BatchMix, CachedBatches, Loaders, Normalize
from research.inputs.routes import Layer, Route
from research.models import Preprocessing

# part of a stored teacher output's key: bump it when what is stored changes, or how views are drawn
# (research/inputs/loaders.py epoch_plan, BatchAugment; features.view_chunks), so no stale logits are read back
TEACHER_CODE_VERSION = 1


@dataclasses.dataclass
class TeacherVersion:
    """A registered model version as a teacher: where it is, what it was trained on."""

    given: str  # the URI as the config gave it (models:/NAME@ALIAS)
    name: str
    version: str
    run_id: str
    dataset_digest: str
    dataset_version: str
    model: str

    @property
    def pinned(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse_uri(uri: str) -> tuple[str, str, str]:
    """models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/STAGE -> (name, "alias"|"version"|"stage", ref)."""
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        return name, "alias", alias
    name, _, ref = rest.rpartition("/")
    return name, "version" if ref.isdigit() else "stage", ref


def find_version(uri: str) -> TeacherVersion:
    """The registered version `uri` names now, with its lineage tags (written by `promote`)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from research.errors import first_line

    client = mlflow.MlflowClient()
    name, kind, ref = parse_uri(uri)
    try:
        if kind == "alias":
            mv = client.get_model_version_by_alias(name, ref)
        elif kind == "version":
            mv = client.get_model_version(name, ref)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated upstream; they still resolve
                found = client.get_latest_versions(name, [ref])
            if not found:
                raise MlflowException(f"no version of {name} in stage {ref}")
            mv = found[0]
    except MlflowException as exc:
        raise ConfigError(f"teacher={uri!r}: no such registered model version ({first_line(exc)}); register one with "
                          "`python -m research promote --run RUN_ID --name NAME`, or list them in `python -m research "
                          "ui`.") from None
    tags = mv.tags or {}
    return TeacherVersion(uri, name, str(mv.version), tags.get("source_run_id") or mv.run_id or "",
                          tags.get("dataset_digest", ""), tags.get("dataset_version", ""), tags.get("model", ""))


def refuse_other_data(teacher: TeacherVersion, digest: str, version_name: str) -> None:
    if teacher.dataset_digest != digest:
        raise ConfigError(
            f"teacher {teacher.given} (version {teacher.version}, run {teacher.run_id}) was trained on dataset "
            f"{teacher.dataset_version or '?'} (digest {teacher.dataset_digest[:12] or '?'}), this run trains on "
            f"{version_name} (digest {digest[:12]}): the teacher's training images could be this run's val or test "
            f"images. Distil from a teacher trained on {version_name}, or train on the teacher's dataset version.")


def load_module(teacher: TeacherVersion) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The version's torch module (a training run's model, or an ensemble's) and its model_meta.json."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import Model

    from research.serving import read_meta

    with tempfile.TemporaryDirectory(prefix="research-teacher-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(teacher.pinned, dst_path=tmp))
        flavors = Model.load(str(local / "MLmodel")).flavors
        torch_dir = local if "pytorch" in flavors else local / "artifacts" / "torch_model"  # an older pyfunc wrapper
        if not (torch_dir / "MLmodel").is_file():
            raise ConfigError(f"teacher {teacher.given} (version {teacher.version}) holds no torch model: it was not "
                              "registered by `python -m research promote`.")
        module = mlflow.pytorch.load_model(str(torch_dir), map_location="cpu")
        return module.eval().requires_grad_(False), read_meta(torch_dir)


class TeacherNet(torch.nn.Module):
    """A teacher's served logits: its module's output over its calibration temperature (softmax: what it serves)."""

    def __init__(self, module: torch.nn.Module, temperature: float) -> None:
        super().__init__()
        self.module, self.temperature = module, float(temperature)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).float() / self.temperature


def scaled_box(params: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """BatchAugment parameters drawn at one size, for an image `ratio` times as large: the crop box scales, so the
    affine map (in the image's normalised coordinates) and so the view are the same; the rest has no size."""
    return params | {k: params[k] * ratio for k in ("top", "left", "h", "w")}


class TeacherLayer(Layer):
    KEY = "teacher"
    WHEN = "a teacher (teacher: models:/NAME@ALIAS)"
    KEYS = {"distill_weight": "; set teacher, or leave distill_weight unset.",
            "distill_temperature": "; set teacher, or leave distill_temperature unset."}

    def __init__(self, inner: Route, cfg: TrainConfig) -> None:
        super().__init__(inner, cfg)
        self.given = cfg.teacher
        self.found: TeacherVersion | None = None
        self.net: TeacherNet | None = None
        self.prep: Preprocessing | None = None
        self.stored: Path | None = None

    def check(self, cfg: TrainConfig) -> None:
        self.inner.check(cfg)
        if not str(cfg.teacher).startswith("models:/"):
            raise ConfigError(f"teacher={cfg.teacher!r}: give a registered model, models:/NAME@ALIAS or "
                              "models:/NAME/VERSION (register a run with `python -m research promote --run RUN_ID "
                              "--name NAME`).")
        if cfg.loader == "folder":
            raise ConfigError("teacher with loader=folder: the folder loader draws per-image torchvision transforms "
                              "that the teacher cannot replay on its own view; use loader=cached (or features).")

    def resolve(self, cfg: TrainConfig) -> TrainConfig:
        """Pin the teacher to the version its URI names now (an alias may move while a study runs); refuse one
        trained on other data before anything is built."""
        from research.data.versions import load_version

        self.found = find_version(cfg.teacher)
        version = load_version(cfg.dataset, cfg.data_root)
        if self.found.dataset_digest:  # versions registered before promote tagged it: model_meta.json says (build)
            refuse_other_data(self.found, version.digest, version.name)
        return dataclasses.replace(self.inner.resolve(cfg), teacher=self.found.pinned)

    def build(self, version, model, prep, cfg, device) -> Route:
        self.cfg = cfg
        if self.found is None:
            self.found = find_version(cfg.teacher)
        module, meta = load_module(self.found)
        refuse_other_data(dataclasses.replace(self.found, dataset_digest=meta.get("dataset_digest", ""),
                                              dataset_version=meta.get("dataset_version", "")),
                          version.digest, version.name)
        if list(meta["classes"]) != list(version.classes):
            raise ConfigError(f"teacher {self.given}: its classes {meta['classes']} are not this run's "
                              f"{list(version.classes)}.")
        self.found.model = str(meta.get("model") or self.found.model)
        self.prep = Preprocessing(int(meta["image_size"]), tuple(meta["mean"]), tuple(meta["std"]),
                                  meta["interpolation"])
        if cfg.augment.cutmix > 0 and self.prep.image_size != prep.image_size:
            raise ConfigError(f"augment.cutmix={cfg.augment.cutmix} with a teacher at {self.prep.image_size} px and a "
                              f"student at {prep.image_size} px: CutMix draws its box in pixels, so the two would "
                              "see other views. Set augment.cutmix=0 (mixup is fine), or image_size="
                              f"{self.prep.image_size}.")
        # NHWC: the faster layout for convolutions on CPU and GPU alike (as the stored activations use)
        module = module.to(device, memory_format=torch.channels_last)
        self.net = TeacherNet(module, float(meta.get("temperature", 1.0)))
        self.device = device
        self.normalize = Normalize(device, self.prep.mean, self.prep.std)
        self.augment = BatchAugment(cfg.augment, self.prep.image_size, device, self.prep.mean, self.prep.std)
        self.inner.build(version, model, prep, cfg, device)
        inner = self.inner.data
        if self.inner.stored_views:
            logits = self.stored_logits(version, prep, cfg, device)
            train = StoredTeacherStream(inner.train, logits, device)
        else:
            images = decoded.ensure_cache(version, self.prep.image_size, interpolation=self.prep.interpolation)
            train = OnBatchTeacherStream(inner.train, self, CachedBatches(
                images.arrays["train"], images.labels["train"], device, True), prep.image_size,
                BatchMix(cfg.augment, len(version.classes)), self.epochs_store(version, prep, cfg))
        self.data = Loaders(train, inner.val, inner.test, inner.classes, inner.train_labels)
        return self

    # ---------------------------------------------------------------------------- the teacher's view

    def view(self, images: torch.Tensor, params: dict[str, torch.Tensor] | None, student_size: int) -> torch.Tensor:
        """uint8 [n, 3, St, St] at the teacher's size -> the teacher's normalised view: plain (params None), or the
        augmentation drawn for the student at `student_size`, its crop box scaled to the teacher's size."""
        if params is None:
            return self.normalize(images)
        return self.augment.apply(images, scaled_box(params, self.prep.image_size / student_size))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bool(self.cfg.amp)):
            return self.net(x).float()

    # ---------------------------------------------------------------------------- stored views

    def store_key(self, version, prep: Preprocessing, cfg: TrainConfig) -> dict[str, Any]:
        """What a stored teacher output depends on: the views (data, their number, augmentation, seed, the size
        their parameters were drawn at) and the teacher (weights, calibration, preprocessing)."""
        return {"dataset_digest": version.digest, "views": cfg.feature_views,
                "augment": dataclasses.asdict(cfg.augment), "seed": cfg.seed,
                "student_image_size": prep.image_size, "chunk": EMBED_BATCH,
                "teacher": weights_digest(self.net.module), "temperature": self.net.temperature,
                "teacher_prep": self.prep.as_dict(), "amp": bool(cfg.amp), "code": TEACHER_CODE_VERSION}

    def epochs_store(self, version, prep: Preprocessing, cfg: TrainConfig,
                     cache_root: str | Path = "data/cache") -> Path:
        """Where the teacher's logits on each epoch's views are kept. An epoch's views are a function of the data,
        the seed, the sampler, the batch size and the augmentation alone, so every run that draws the same ones (a
        study's trials searching lr, schedule, distillation weight and temperature) reads the teacher's logits
        from here instead of running the teacher again."""
        key = {"dataset_digest": version.digest, "augment": dataclasses.asdict(cfg.augment), "seed": cfg.seed,
               "sampler": cfg.sampler, "drs_epoch": cfg.drs_epoch, "batch_size": cfg.batch_size,
               "student_image_size": prep.image_size, "teacher": weights_digest(self.net.module),
               "temperature": self.net.temperature, "teacher_prep": self.prep.as_dict(), "amp": bool(cfg.amp),
               "code": TEACHER_CODE_VERSION}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache_root) / "teacher" / f"{version.name}-epochs-{digest}"
        path.mkdir(parents=True, exist_ok=True)
        if not (path / "key.json").is_file():
            (path / "key.json").write_text(json.dumps(key, indent=2))
        self.stored = path
        return path

    def stored_logits(self, version, prep: Preprocessing, cfg: TrainConfig, device: torch.device,
                      cache_root: str | Path = "data/cache") -> np.ndarray:
        """[1 + feature_views, N, C] teacher logits of every stored training view, computed once (atomic)."""
        key = self.store_key(version, prep, cfg)
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache_root) / "teacher" / f"{version.name}-{digest}"
        with decoded.build_lock(path):
            if not (path / "key.json").is_file():
                self._build_store(path, key, version, prep, device, cache_root)
        self.stored = path
        return np.load(path / "train.npy")

    def _build_store(self, path: Path, key: dict, version, prep: Preprocessing, device: torch.device,
                     cache_root: str | Path) -> None:
        from research.data.pool import progress_bar

        images = decoded.ensure_cache(version, self.prep.image_size, cache_root,
                                      interpolation=self.prep.interpolation).arrays["train"]
        views = 1 + self.cfg.feature_views
        out = np.zeros((views, len(images), len(version.classes)), np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            with progress_bar(True, views * len(images), f"teacher {self.found.pinned} on {views} train views") as adv:
                for view, start, stop, params in self.inner.stored_view_chunks(len(images)):
                    x = torch.from_numpy(np.array(images[start:stop])).to(device).permute(0, 3, 1, 2)
                    out[view, start:stop] = self.logits(self.view(x, params, prep.image_size)).cpu().numpy()
                    adv(stop - start)
            np.save(tmp / "train.npy", out)
            (tmp / "key.json").write_text(json.dumps(key, indent=2))
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---------------------------------------------------------------------------- training

    def loss(self, criterion: torch.nn.Module, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(1 - w) x the inner route's loss + w x T^2 x KL(teacher_T || student_T), batch mean."""
        w, t = self.cfg.distill_weight, self.cfg.distill_temperature
        label = self.inner.loss(criterion, logits, batch)
        student = F.log_softmax(logits.float() / t, dim=1)
        teacher = F.log_softmax(batch.extras["teacher"].float() / t, dim=1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        return (1.0 - w) * label + w * t * t * kl

    def params(self) -> dict[str, Any]:
        found = self.found
        return self.inner.params() | {
            "teacher.uri": self.given, "teacher.version": found.version, "teacher.run_id": found.run_id,
            "teacher.dataset_digest": found.dataset_digest, "teacher.model": found.model,
            "teacher.image_size": self.prep.image_size,
            "teacher.outputs": "stored" if self.inner.stored_views else "on each batch"}

    def tags(self) -> dict[str, str]:
        return self.inner.tags() | {"distilled_from": self.found.pinned, "teacher_run_id": self.found.run_id}

    def describe(self) -> str:
        inner = self.inner.describe()
        where = "stored" if self.inner.stored_views else "on each batch"
        where += f", kept in {self.stored}" if self.stored else ""
        return (f"{inner}, " if inner else "") + (
            f"teacher {self.found.pinned} ({self.found.model}, {self.prep.image_size} px, {where}; "
            f"weight {self.cfg.distill_weight}, T {self.cfg.distill_temperature})")


class StoredTeacherStream:
    """The inner stream's batches with the stored teacher logits of the same rows and views."""

    def __init__(self, inner, logits: np.ndarray, device: torch.device) -> None:
        self.inner, self.logits, self.device = inner, torch.from_numpy(logits), device

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for batch in _closing(self.inner.epoch(epoch)):
            teacher = self.logits[batch.extras["view"], batch.extras["index"]].to(self.device)
            yield Batch(batch[0], batch[1], batch.extras | {"teacher": teacher})


class OnBatchTeacherStream:
    """The inner stream's batches with the teacher's logits on each batch's own view, made from the teacher's
    decoded store: the same rows, the augmentation parameters drawn for the student (crop box scaled), the same
    mixup draw. A whole epoch's logits are kept in `store` (epoch-<e>.npz, with the rows they belong to) and read
    back by any later run that draws the same views; a kept batch whose rows differ is computed again."""

    def __init__(self, inner, layer: TeacherLayer, images: CachedBatches, student_size: int, mix: BatchMix,
                 store: Path) -> None:
        self.inner, self.layer, self.images, self.student_size, self.mix = inner, layer, images, student_size, mix
        self.store = store

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        kept = self.kept(epoch)
        rows, outputs, start, fresh = [], [], 0, kept is None
        for batch in _closing(self.inner.epoch(epoch)):
            extras, index = batch.extras, batch.extras["index"]
            stop = start + len(index)
            if kept is not None and torch.equal(kept[0][start:stop], index):
                logits = kept[1][start:stop].to(self.layer.device)
            else:
                logits, fresh = self.logits_of(extras), True
            rows.append(index)
            outputs.append(logits.cpu())
            start = stop
            yield Batch(batch[0], batch[1], extras | {"teacher": logits})
        if fresh and rows:  # a whole epoch: keep it (atomic; a run stopped mid-epoch keeps nothing)
            tmp = self.store / f".epoch-{epoch}.{os.getpid()}.npz"
            np.savez(tmp, index=torch.cat(rows).numpy(), logits=torch.cat(outputs).numpy())
            os.replace(tmp, self.store / f"epoch-{epoch}.npz")

    def kept(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.store / f"epoch-{epoch}.npz"
        if not path.is_file():
            return None
        with np.load(path) as kept:
            return torch.from_numpy(kept["index"]), torch.from_numpy(kept["logits"])

    def logits_of(self, extras: dict[str, Any]) -> torch.Tensor:
        x, y = self.images.gather(extras["index"])
        x = self.layer.view(x, extras["augment"], self.student_size)
        if self.mix:
            x, _ = self.mix(x, y, extras["mix_seed"])
        return self.layer.logits(x)


def _closing(iterable) -> Iterator:
    """Iterate, closing the inner iterator (its prefetch thread) however the outer one ends."""
    it = iter(iterable)
    try:
        yield from it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
