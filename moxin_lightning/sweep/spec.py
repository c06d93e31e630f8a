"""A W&B sweep spec (the YAML `wandb sweep` reads), checked and turned into Optuna's search space.

Every form is checked before any trial runs, and anything Optuna cannot sample the way W&B would is a one-line
error naming the parameter and the fix, rather than a sweep that quietly searches a different space.

W&B form                                        Optuna
value / distribution: constant                  a fixed argument (not searched)
values / distribution: categorical              CategoricalDistribution
min, max (both ints) / int_uniform              IntDistribution(min, max)
min, max / uniform                              FloatDistribution(min, max)
q_uniform (min, max multiples of q)             Int/FloatDistribution(min, max, step=q)
log_uniform (min, max: exponents of e)          FloatDistribution(e^min, e^max, log=True)
log_uniform_values / inv_log_uniform_values     FloatDistribution(min, max, log=True)  (1/X log-uniform <=> X is)
inv_log_uniform (exponents)                     FloatDistribution(e^-max, e^-min, log=True)
q_log_uniform_values with q = 1, integer bounds IntDistribution(min, max, log=True)
nested `parameters:`                            flattened to dotted names (model.init_args.lr)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
TOP_LEVEL_KEYS = {
    "program",
    "method",
    "metric",
    "parameters",
    "early_terminate",
    "command",
    "name",
    "description",
    "project",
    "entity",
    "run_cap",
}
PARAMETER_KEYS = {"value", "values", "min", "max", "q", "distribution", "parameters"}
SUPPORTED = (
    "constant, categorical, int_uniform, uniform, q_uniform, log_uniform, log_uniform_values, "
    "inv_log_uniform, inv_log_uniform_values, q_log_uniform_values"
)
RANGES = (
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "inv_log_uniform",
    "inv_log_uniform_values",
    "q_log_uniform_values",
)
# W&B forms with no faithful Optuna sampler, and what to write instead
UNFAITHFUL = {
    "normal": "a normal prior",
    "q_normal": "a normal prior",
    "log_normal": "a log-normal prior",
    "q_log_normal": "a log-normal prior",
    "beta": "a beta prior",
    "q_beta": "a beta prior",
    "q_log_uniform": "a rounded log-uniform over exponents",
}
ARGS_MACROS = (
    "args",
    "args_no_equals",
    "args_no_hyphens",
    "args_no_boolean_flags",
    "args_json",
    "args_json_file",
    "args_dict",
    "args_append_hydra",
    "args_override_hydra",
)
MACROS = ("env", "interpreter", "program", *ARGS_MACROS)
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SpecError(ValueError):
    """A sweep spec that cannot run as written; the message is one line saying what to change."""


@dataclass
class Parameter:
    """One swept (or fixed) flag. Choices Optuna cannot store (lists, dicts) travel as JSON text in Optuna and
    are turned back into the YAML values when the command is built."""

    name: str
    distribution: BaseDistribution | None = None  # None: a constant
    constant: Any = None
    decoded: dict[str, Any] = field(default_factory=dict)  # JSON text -> original list/dict choice

    def decode(self, value: Any) -> Any:
        return self.decoded.get(value, value) if isinstance(value, str) else value


@dataclass
class EarlyTerminate:
    """W&B's hyperband, as Optuna's HyperbandPruner: iterations are the times the metric was logged."""

    min_iter: int
    eta: int
    max_iter: int | None

    def pruner(self) -> optuna.pruners.BasePruner:
        return optuna.pruners.HyperbandPruner(
            min_resource=self.min_iter, max_resource=self.max_iter or "auto", reduction_factor=self.eta
        )


@dataclass
class SweepSpec:
    name: str
    method: str
    metric: str
    goal: str
    parameters: list[Parameter]
    command: list[str]
    program: str | None = None
    target: float | None = None
    run_cap: int | None = None
    early_terminate: EarlyTerminate | None = None
    fingerprint: str = ""  # of the searched space and the command: a stored study must match it

    @property
    def direction(self) -> str:
        return self.goal

    @property
    def searched(self) -> dict[str, BaseDistribution]:
        return {p.name: p.distribution for p in self.parameters if p.distribution is not None}

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's search space (grid specs only): each searched parameter's choices."""
        return {name: list(dist.choices) for name, dist in self.searched.items()}  # type: ignore[attr-defined]

    def grid_size(self) -> int:
        return math.prod(len(choices) for choices in self.grid().values())

    def sampler(self, seed: int | None = None) -> optuna.samplers.BaseSampler:
        """Grid: always the same shuffle of the points (seed 0), since a continued study's stored grid ids index
        it; random and bayes draw from `seed`."""
        if self.method == "grid":
            return optuna.samplers.GridSampler(self.grid(), seed=0)
        if self.method == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def pruner(self) -> optuna.pruners.BasePruner:
        return self.early_terminate.pruner() if self.early_terminate else optuna.pruners.NopPruner()

    def arguments(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """All flags of one trial in spec order, constants included, with their YAML values."""
        return {p.name: p.constant if p.distribution is None else p.decode(sampled[p.name]) for p in self.parameters}


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep YAML (as `wandb sweep` does: yaml.safe_load); the sweep's name is its `name`
    key, else the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"sweep spec {path} does not exist; give a YAML file such as sweeps/phase1-lr-warmup.yaml"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path} must be a mapping with method, metric and parameters (W&B's sweep format)")
    return parse_spec(raw, default_name=path.stem)


def parse_spec(raw: dict[str, Any], default_name: str = "sweep") -> SweepSpec:
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise SpecError(f"unknown sweep key {unknown[0]!r}; a W&B sweep spec has {', '.join(sorted(TOP_LEVEL_KEYS))}")
    method = raw.get("method")
    if method not in METHODS:
        raise SpecError(f"method {method!r} is not supported; use grid, random or bayes")
    metric = raw.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise SpecError("metric: give {name: <logged metric, e.g. val/loss>, goal: minimize|maximize} to rank trials")
    goal = metric.get("goal", "minimize")
    if goal not in GOALS:
        raise SpecError(f"metric.goal {goal!r} is not supported; use minimize or maximize")
    extra = sorted(set(metric) - {"name", "goal", "target"})
    if extra:
        raise SpecError(f"unknown metric key {extra[0]!r}; metric takes name, goal and target")
    name = str(raw.get("name") or default_name)
    if not _NAME.match(name):
        raise SpecError(f"sweep name {name!r} names a folder: use letters, digits, '.', '_' and '-' only")
    if not isinstance(raw.get("parameters"), dict) or not raw["parameters"]:
        raise SpecError("parameters: give at least one parameter, e.g. model.init_args.lr: {values: [1e-3, 3e-3]}")
    parameters = _parameters(raw["parameters"], prefix="")
    if method == "grid":
        for p in parameters:
            if p.distribution is not None and not isinstance(p.distribution, CategoricalDistribution):
                raise SpecError(
                    f"parameter {p.name}: method grid needs `values` (or `value`); list the values or use random/bayes"
                )
    if not any(p.distribution is not None for p in parameters):
        raise SpecError("every parameter is a constant; give one `values` list or range to sweep")
    program = raw.get("program")
    command = raw.get("command", DEFAULT_COMMAND)
    if not isinstance(command, list) or not command:
        raise SpecError(
            "command must be a list of words, e.g. [${env}, ${interpreter}, -m, moxin_lightning, fit, ..., ${args}]"
        )
    command = [str(word) for word in command]
    for word in command:
        if word.startswith("${") and word.endswith("}") and word[2:-1] not in MACROS:
            raise SpecError(
                f"command word {word} is not a W&B macro; use one of {', '.join('${' + m + '}' for m in MACROS)}"
            )
    if "${program}" in command and not program:
        raise SpecError("the command uses ${program} but the spec has no `program:`; add one or drop ${program}")
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        raise SpecError(f"run_cap {run_cap!r} must be a positive integer")
    target = metric.get("target")
    if target is not None and not _is_number(target):
        raise SpecError(f"metric.target {target!r} must be a number")
    spec = SweepSpec(
        name=name,
        method=method,
        metric=metric["name"],
        goal=goal,
        parameters=parameters,
        command=command,
        program=None if program is None else str(program),
        target=None if target is None else float(target),
        run_cap=run_cap,
        early_terminate=_early_terminate(raw.get("early_terminate")),
    )
    spec.fingerprint = _fingerprint(raw)
    return spec


def _parameters(section: dict[str, Any], prefix: str) -> list[Parameter]:
    parameters = []
    for key, config in section.items():
        name = f"{prefix}{key}"
        if not isinstance(config, dict):
            raise SpecError(
                f"parameter {name}: give a mapping such as {{values: [...]}} or {{value: x}}, not {config!r}"
            )
        if "parameters" in config:
            if set(config) != {"parameters"} or not isinstance(config["parameters"], dict):
                raise SpecError(f"parameter {name}: nested `parameters:` must be the only key and a mapping")
            parameters += _parameters(config["parameters"], prefix=f"{name}.")
        else:
            parameters.append(parameter(name, config))
    return parameters


def parameter(name: str, config: dict[str, Any]) -> Parameter:
    """One W&B parameter spec as a constant or an Optuna distribution (see the module's table)."""
    if "probabilities" in config:
        raise SpecError(f"parameter {name}: `probabilities` has no Optuna sampler offline; drop it (uniform choice)")
    unknown = sorted(set(config) - PARAMETER_KEYS)
    if unknown:
        raise SpecError(f"parameter {name}: unknown key {unknown[0]!r}; use value, values, min, max, q, distribution")
    kind = config.get("distribution")
    if kind is None:
        if "value" in config and "values" in config:
            raise SpecError(f"parameter {name}: give `value` or `values`, not both")
        if "value" in config:
            kind = "constant"
        elif "values" in config:
            kind = "categorical"
        elif "min" in config and "max" in config:
            kind = "int_uniform" if _is_int(config["min"]) and _is_int(config["max"]) else "uniform"
        else:
            raise SpecError(f"parameter {name}: give `value`, `values`, or `min` and `max`")
    if kind in UNFAITHFUL:
        raise SpecError(
            f"parameter {name}: distribution {kind} ({UNFAITHFUL[kind]}) has no faithful Optuna sampler; "
            "use uniform, log_uniform_values or values"
        )
    if kind == "constant":
        if "value" not in config:
            raise SpecError(f"parameter {name}: distribution constant needs `value`")
        return Parameter(name, constant=config["value"])
    if kind == "categorical":
        values = config.get("values")
        if not isinstance(values, list) or not values:
            raise SpecError(f"parameter {name}: `values` must be a non-empty list")
        return _categorical(name, values)
    if kind not in RANGES:
        raise SpecError(f"parameter {name}: unknown distribution {kind!r}; supported: {SUPPORTED}")
    low, high = _bounds(name, config)
    q = config.get("q", 1)
    if not _is_number(q) or q <= 0:
        raise SpecError(f"parameter {name}: q must be a positive number, not {q!r}")
    if kind == "int_uniform":
        if not (_is_int(low) and _is_int(high)):
            raise SpecError(f"parameter {name}: int_uniform needs integer min and max; use uniform for floats")
        return Parameter(name, IntDistribution(low, high))
    if kind == "uniform":
        return Parameter(name, FloatDistribution(float(low), float(high)))
    if kind == "q_uniform":
        return Parameter(name, _stepped(name, low, high, q))
    if kind in ("log_uniform", "inv_log_uniform"):  # min/max are exponents of e
        low, high = (math.exp(low), math.exp(high)) if kind == "log_uniform" else (math.exp(-high), math.exp(-low))
        return Parameter(name, FloatDistribution(low, high, log=True))
    if low <= 0:
        raise SpecError(
            f"parameter {name}: {kind} needs min > 0 (values, not exponents); use log_uniform for exponents"
        )
    if kind in ("log_uniform_values", "inv_log_uniform_values"):
        return Parameter(name, FloatDistribution(float(low), float(high), log=True))
    # q_log_uniform_values: Optuna's log-scale sampling of integers needs step 1
    if q != 1 or not (_is_int(low) and _is_int(high)):
        raise SpecError(
            f"parameter {name}: q_log_uniform_values samples faithfully only with q: 1 and integer min/max; "
            "use log_uniform_values for floats"
        )
    return Parameter(name, IntDistribution(low, high, log=True))


def _categorical(name: str, values: list[Any]) -> Parameter:
    decoded: dict[str, Any] = {}
    choices = []
    for value in values:
        if isinstance(value, (list, dict)):
            text = json.dumps(value, sort_keys=True)
            decoded[text] = value
            choices.append(text)
        elif value is None or isinstance(value, (bool, int, float, str)):
            choices.append(value)
        else:
            raise SpecError(f"parameter {name}: value {value!r} is not a YAML scalar, list or mapping")
    if len(set(map(json.dumps, choices))) != len(choices):
        raise SpecError(f"parameter {name}: `values` lists a value twice; list each once")
    return Parameter(name, CategoricalDistribution(choices), decoded=decoded)


def _bounds(name: str, config: dict[str, Any]) -> tuple[Any, Any]:
    for key in ("min", "max"):
        value = config.get(key)
        if isinstance(value, str):
            raise SpecError(
                f"parameter {name}: {key} {value!r} is text (YAML reads 1e-4 without a dot as a string); write 1.0e-4"
            )
        if not _is_number(value):
            raise SpecError(f"parameter {name}: give a number for `{key}`")
    if config["min"] > config["max"]:
        raise SpecError(f"parameter {name}: min {config['min']} is above max {config['max']}")
    return config["min"], config["max"]


def _stepped(name: str, low: Any, high: Any, q: Any) -> BaseDistribution:
    """W&B rounds a uniform draw to a multiple of q; Optuna steps from min: the same values when min and max
    are multiples of q."""
    for bound in (low, high):
        if abs(bound / q - round(bound / q)) > 1e-9:
            raise SpecError(f"parameter {name}: q_uniform needs min and max that are multiples of q={q}; round them")
    if _is_int(low) and _is_int(high) and _is_int(q):
        return IntDistribution(low, high, step=q)
    return FloatDistribution(float(low), float(high), step=float(q))


def _early_terminate(config: Any) -> EarlyTerminate | None:
    if config is None:
        return None
    if not isinstance(config, dict) or config.get("type") != "hyperband":
        raise SpecError("early_terminate: only {type: hyperband, min_iter, eta, max_iter} is supported")
    unknown = sorted(set(config) - {"type", "min_iter", "max_iter", "eta", "s", "strict"})
    if unknown:
        raise SpecError(f"early_terminate: unknown key {unknown[0]!r}; hyperband takes min_iter, max_iter, eta, s")
    if config.get("strict"):
        raise SpecError("early_terminate.strict has no Optuna counterpart; drop it")
    for key in ("min_iter", "max_iter", "eta", "s"):
        value = config.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            raise SpecError(f"early_terminate.{key} must be a positive integer, not {value!r}")
    eta = config.get("eta", 3)
    if eta < 2:
        raise SpecError("early_terminate.eta must be at least 2")
    min_iter, max_iter, brackets = config.get("min_iter"), config.get("max_iter"), config.get("s")
    if min_iter is None:
        if max_iter is None:
            raise SpecError("early_terminate: give min_iter (or max_iter with s)")
        min_iter = max(1, round(max_iter / eta ** (brackets or 0)))  # W&B: s brackets below max_iter
    elif brackets is not None:
        raise SpecError("early_terminate: give min_iter or s, not both (Optuna derives the brackets)")
    if max_iter is not None and max_iter < min_iter:
        raise SpecError(f"early_terminate.max_iter {max_iter} is below min_iter {min_iter}")
    return EarlyTerminate(min_iter=min_iter, eta=eta, max_iter=max_iter)


def _fingerprint(raw: dict[str, Any]) -> str:
    kept = {key: raw.get(key) for key in ("method", "metric", "parameters", "command", "program", "early_terminate")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
