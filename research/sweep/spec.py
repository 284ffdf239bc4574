"""The study spec (`sweeps/*.yaml`): what to search, over which TrainConfig, for how many trials.

Validation builds the base TrainConfig and one probe config per searched key, and the sampler, the pruner
and every search distribution with Optuna's own constructors; the objective must be a metric the trainer
logs each epoch. So a spec with a typo or a value the trainer or Optuna refuses fails when it is loaded,
before any study, parent run or trial exists, not hours into a study.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

from research import configfile
from research.config import SEED_MAX, Range, TrainConfig, check_ranges
from research.errors import ConfigError


@dataclasses.dataclass
class ParamSpec:
    type: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    def validate(self) -> None:
        if self.type not in ("float", "int", "categorical"):
            raise ConfigError(f"search space type={self.type!r}: use float, int or categorical.")
        if self.type == "categorical":
            if not self.choices:
                raise ConfigError("a categorical parameter needs a non-empty `choices` list.")
            return
        if self.low is None or self.high is None or not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ConfigError(f"{self.type} parameter needs finite low and high "
                              f"(got low={self.low}, high={self.high}).")
        if self.low > self.high:
            raise ConfigError(f"{self.type} parameter needs low <= high (got low={self.low}, high={self.high}).")
        if self.log and self.low <= 0:
            raise ConfigError(f"log-scale parameter needs low > 0 (got {self.low}).")

    def distribution(self):
        """The Optuna distribution a trial samples from (ValueError from Optuna's constructor when it refuses)."""
        from optuna import distributions

        if self.type == "categorical":
            return distributions.CategoricalDistribution(self.choices)
        if self.type == "int":
            return distributions.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def check_distribution(self, key: str) -> None:
        """Optuna accepts it, and an int parameter's low, high and step are whole numbers."""
        if self.type == "int":
            fractional = [f"{k}={v}" for k, v in (("low", self.low), ("high", self.high), ("step", self.step))
                          if v is not None and not float(v).is_integer()]
            if fractional:
                raise ConfigError(f"space.{key}: an int parameter takes whole numbers ({', '.join(fractional)}); "
                                  "use type: float for fractions.")
        try:
            self.distribution()
        except ValueError as exc:
            raise ConfigError(f"space.{key}: Optuna refuses this {self.type} distribution: {str(exc).rstrip('.')}. "
                              "A step must be > 0, and log: true takes no step.") from exc

    def probes(self) -> list[Any]:
        """Every choice, or both bounds: the values the trainer must accept before a study starts."""
        if self.type == "categorical":
            return list(self.choices)
        cast = float if self.type == "float" else int
        return [cast(self.low), cast(self.high)]

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high


@dataclasses.dataclass
class ObjectiveSpec:
    metric: str = "val_f1_macro"
    direction: str = "maximize"

    def validate(self) -> None:
        from research.runlog import EPOCH_METRICS  # here, not at the top: runlog imports torch and MLflow

        if self.direction not in ("maximize", "minimize"):
            raise ConfigError(f"objective.direction={self.direction!r}: use maximize or minimize.")
        if self.metric not in EPOCH_METRICS:
            raise ConfigError(f"objective.metric={self.metric!r} is not a metric the trainer logs each epoch; use one "
                              f"of {', '.join(EPOCH_METRICS)} (default val_f1_macro).")


@dataclasses.dataclass
class SamplerSpec:
    name: str = "tpe"  # tpe | random
    seed: int | None = 0
    n_startup_trials: int = 5

    def validate(self) -> None:
        if self.name not in ("tpe", "random"):
            raise ConfigError(f"sampler.name={self.name!r}: use tpe or random.")
        check_ranges(self, {"seed": Range(f"[0, {SEED_MAX}]", "numpy's seed range; null: a random seed"),
                            "n_startup_trials": Range("[0, inf)", "random trials before TPE models the results")},
                     "sampler.")
        try:
            self.build()
        except ValueError as exc:
            raise ConfigError(f"sampler: Optuna refuses it: {str(exc).rstrip('.')}.") from exc

    def build(self):
        """The Optuna sampler the spec names."""
        import optuna

        if self.name == "random":
            return optuna.samplers.RandomSampler(seed=self.seed)
        return optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.n_startup_trials)


@dataclasses.dataclass
class PrunerSpec:
    name: str = "median"  # median | hyperband | none
    n_startup_trials: int = 2  # median
    n_warmup_steps: int = 1  # median: epochs before pruning
    min_resource: int = 1  # hyperband
    reduction_factor: int = 3  # hyperband

    def validate(self) -> None:
        if self.name not in ("median", "hyperband", "none"):
            raise ConfigError(f"pruner.name={self.name!r}: use median, hyperband or none.")

    def build(self, epochs: int):
        """The Optuna pruner the spec names, for trials of `epochs` epochs (hyperband's max_resource).

        Optuna's HyperbandPruner checks its parameters only when the first trial reports (a reduction_factor
        of 1 then fails every trial); its brackets are SuccessiveHalvingPruners, whose constructor checks them,
        so one is built here first. ValueError from Optuna names the parameter."""
        import optuna

        if self.name == "none":
            return optuna.pruners.NopPruner()
        if self.name == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.n_startup_trials,
                                               n_warmup_steps=self.n_warmup_steps)
        if self.min_resource > epochs:
            raise ValueError(f"min_resource={self.min_resource} is more than the trials' {epochs} epochs")
        optuna.pruners.SuccessiveHalvingPruner(min_resource=self.min_resource, reduction_factor=self.reduction_factor)
        return optuna.pruners.HyperbandPruner(min_resource=self.min_resource, max_resource=epochs,
                                              reduction_factor=self.reduction_factor)


@dataclasses.dataclass
class SweepSpec:
    base: dict[str, Any]  # TrainConfig keys
    # TrainConfig key (dotted for nested: augment.mixup) -> distribution; {} = one fixed config
    space: dict[str, ParamSpec]
    study_name: str | None = None
    experiment: str | None = None  # default: sweep-<study_name>
    n_trials: int = 10
    timeout: float | None = None  # seconds, per worker
    objective: ObjectiveSpec = dataclasses.field(default_factory=ObjectiveSpec)
    sampler: SamplerSpec = dataclasses.field(default_factory=SamplerSpec)
    pruner: PrunerSpec = dataclasses.field(default_factory=PrunerSpec)
    heartbeat_interval: float = 10.0
    heartbeat_grace: float = 60.0
    description: str = ""
    # trials to run first, e.g. a known good config: {param: value} for some or all of `space`'s keys
    # (the rest are sampled). Enqueued once, when the study is new (optuna's enqueue_trial).
    enqueue: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # weights kept: those of the best keep_top_k trials by the objective (and of registered versions); `all`
    keep_top_k: int | Literal["all"] = 3

    def validate(self) -> None:
        if not self.space and self.n_trials != 1:
            raise ConfigError(f"The sweep spec's `space` is empty but n_trials={self.n_trials}: a spec without a space "
                              "is one fixed config (a baseline), so set n_trials: 1, or add a parameter to search, "
                              "e.g. space: {lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}}.")
        if self.study_name is not None and not self.study_name.strip():
            raise ConfigError("study_name is empty: name the study (--study-name NAME, or study_name: in the spec), "
                              "or leave it out to use the spec file's name.")
        self.space = {k: v if isinstance(v, ParamSpec) else configfile.from_dict(ParamSpec, v, f"space.{k}.")
                      for k, v in self.space.items()}
        base = base_config(self)
        try:
            self.pruner.build(base.epochs)
        except ValueError as exc:
            raise ConfigError(f"pruner ({self.pruner.name}): Optuna refuses it: {str(exc).rstrip('.')}.") from exc
        for key, param in self.space.items():
            param.check_distribution(key)
            for value in param.probes():
                try:
                    configfile.replace(base, **nest({key: value}))
                except ConfigError as exc:
                    raise ConfigError(f"space.{key} = {value!r}: {exc}") from exc
        for i, params in enumerate(self.enqueue):
            unknown = sorted(set(params) - set(self.space))
            if unknown:
                raise ConfigError(f"enqueue[{i}]: {', '.join(unknown)} not in the search space; enqueue only sets "
                                  f"searched parameters ({', '.join(self.space) or 'none'}).")
            outside = [f"{k}={v!r}" for k, v in params.items() if not self.space[k].contains(v)]
            if outside:
                raise ConfigError(f"enqueue[{i}]: {', '.join(outside)} outside the search space; widen the space "
                                  "or change the enqueued value.")
        if self.keep_top_k != "all" and self.keep_top_k < 1:
            raise ConfigError(f"keep_top_k={self.keep_top_k} must be a positive number of trials, or `all` (keep "
                              "every trial's weights); pruned and failed trials keep none either way.")
        if self.n_trials <= 0:
            raise ConfigError(f"n_trials={self.n_trials} must be > 0.")
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError(f"timeout={self.timeout} must be a positive number of seconds, or null (no limit).")
        for key in ("heartbeat_interval", "heartbeat_grace"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key}={value} must be a positive number of seconds.")
        if self.heartbeat_grace <= self.heartbeat_interval:
            raise ConfigError("heartbeat_grace must be larger than heartbeat_interval (e.g. 60 and 10).")

    @property
    def kept(self) -> int | None:
        """keep_top_k as a number; None keeps all."""
        return None if self.keep_top_k == "all" else int(self.keep_top_k)

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"sweep-{self.study_name}"


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """`{"augment.mixup": 0.2}` -> `{"augment": {"mixup": 0.2}}`, the shape configfile.replace takes."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def base_config(spec: SweepSpec) -> TrainConfig:
    from research import inputs

    try:
        base = configfile.from_dict(TrainConfig, spec.base, prefix="base.")
        inputs.route(base)  # the input route's own checks (e.g. trainable_stages only on stored features)
        return base
    except ConfigError as exc:
        raise ConfigError(f"sweep spec base: {exc}") from exc


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """A spec from YAML (study name: the file's stem unless set), or from the resolved JSON a launcher writes."""
    path = Path(path)
    data = configfile.merge(configfile.read_yaml(path), overrides or {})  # read_yaml reads a .json file as JSON
    missing = [f"`{key}`" for key in ("base", "space") if key not in data]
    if missing:
        raise ConfigError(f"{path} has no {' and no '.join(missing)}: a sweep spec needs `base` (TrainConfig keys) and "
                          "`space` (the keys to search; {} for one fixed config), e.g. sweeps/demo.yaml.")
    spec = configfile.from_dict(SweepSpec, data)
    if spec.study_name is None and path.suffix != ".json":
        spec.study_name = path.stem
    return spec
