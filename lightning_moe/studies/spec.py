"""Study files (``recipes/<study>/study.yaml``): LightningCLI config(s), a grid of overrides x seeds, the metrics
to collect, the paper's numbers and the claims to check, all as data. The commented example is
``recipes/quickstart_study/study.yaml``; the schema:

.. code-block:: yaml

    name: my_study              # optional; default: the folder's name. Also names the output folder.
    title: "..."                # optional heading of the report
    description: "..."          # optional paragraph under it
    reference: "arXiv ..., Table 1"   # optional: where the paper numbers come from
    base: ../quickstart.yaml    # LightningCLI config(s), relative to this file (a string or a list)
    overrides: {trainer.max_steps: 300}   # optional, applied to every condition
    seeds: [0, 1, 2]
    seed_keys: [seed_everything]          # optional: the dotted keys set to each seed
    metrics: {val/loss: "validation loss (nats/byte)"}   # logged keys -> labels (a plain list works too)
    conditions:
      - name: aux                 # letters, digits and _ . = + , - ; names the runs and the report rows
        overrides: {model.init_args.router.init_args.load_balancing_weight: 0.01}
        configs: [extra.yaml]     # optional LightningCLI configs applied after ``base``
        paper: {val/loss: 2.31}   # the paper's number per metric: a number, {mean: .., std: ..}, or null
    # Optional instead of inline paper numbers: a cartesian grid crossed with the conditions (names like
    # "aux,top_k=1"), with the paper's numbers given by those names.
    # grid: {model.init_args.top_k: [1, 2]}
    # paper: {"aux,top_k=1": {val/loss: 2.4}}
    claims: [{name: "...", kind: less, left: {condition: aux, metric: val/loss}, right: {...}}]
    smoke:                         # what ``--smoke`` changes so the whole study runs in about a minute
      seeds: [0]                   # optional
      overrides: {trainer.max_steps: 5, trainer.limit_val_batches: 2}
    sections: lightning_moe.studies.mine.section:render   # optional: study-specific report sections, see
                                                           # :class:`lightning_moe.studies.report.ReportContext`
    paper_tables:               # optional: the paper's numbers that are no metric of ours (per-layer values,
      cosine: {L0: 0.32}        # trajectories), as plain data for the sections: ``ReportContext.paper_table``
    companions: [lm, beta]      # optional: study folders run and reported with this one, summarised in its report

Overrides are applied in this order, later ones winning: ``overrides``, the condition's, the grid point's, the
seed keys, the smoke overrides; the runner then sets the run's output folder, ``torch_threads`` and its
metric capture. Claims are described in :mod:`lightning_moe.studies.claims`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_moe.studies.claims import Claim, ClaimError, parse_claim

STUDY_FILE = "study.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+,-]*$")
_STUDY_KEYS = {
    "name", "title", "description", "reference", "base", "overrides", "seeds", "seed_keys", "metrics",
    "conditions", "grid", "paper", "claims", "smoke", "sections", "paper_tables", "companions",
}
_CONDITION_KEYS = {"name", "overrides", "configs", "paper", "description"}
_SMOKE_KEYS = {"seeds", "overrides"}


class StudyError(ValueError):
    """A study file or study command that cannot run; the message names the field, the value and the fix."""


@dataclass(frozen=True)
class PaperValue:
    """The paper's number for one (condition, metric): a mean and, where the paper gives one, a std."""

    mean: float
    std: float | None = None


@dataclass(frozen=True)
class Condition:
    """One cell of the grid: a named set of overrides run once per seed."""

    name: str
    overrides: dict[str, Any]
    configs: tuple[Path, ...] = ()
    paper: Mapping[str, PaperValue | None] | None = None
    description: str = ""


@dataclass(frozen=True)
class Study:
    """A parsed, checked study file. Paths are absolute; ``path`` is the study file itself."""

    path: Path
    name: str
    title: str
    description: str
    reference: str
    base: tuple[Path, ...]
    overrides: dict[str, Any]
    seeds: tuple[int, ...]
    seed_keys: tuple[str, ...]
    metrics: dict[str, str]
    conditions: tuple[Condition, ...]
    claims: tuple[Claim, ...]
    smoke_seeds: tuple[int, ...] | None
    smoke_overrides: dict[str, Any]
    sections: str = ""
    paper_tables: dict[str, Any] = dataclasses.field(default_factory=dict)
    companions: tuple[Path, ...] = ()

    @property
    def dir(self) -> Path:
        """The study's folder; config paths and the full report are relative to it."""
        return self.path.parent

    def condition(self, name: str) -> Condition:
        """The condition called ``name``."""
        for c in self.conditions:
            if c.name == name:
                return c
        raise StudyError(f"unknown condition {name!r}; the study has {', '.join(c.name for c in self.conditions)}.")

    def paper_value(self, condition: str, metric: str) -> PaperValue | None:
        """The paper's number for ``(condition, metric)``, or None."""
        return (self.condition(condition).paper or {}).get(metric)


@dataclass(frozen=True)
class RunPlan:
    """One run: a condition at one seed, with every override it applies (in order) and a fingerprint of its
    inputs. A finished run is reused only while its fingerprint matches, so editing the study or a base config
    redoes exactly the runs it changes."""

    run_id: str
    condition: str
    seed: int
    configs: tuple[Path, ...]
    overrides: dict[str, Any]
    fingerprint: str

    def cli_args(self, relative_to: Path | None = None) -> list[str]:
        """``fit --config ... --key=value ...`` for :func:`lightning_moe.cli.main` or ``python -m lightning_moe``;
        config paths are absolute, or relative to ``relative_to`` (for showing a command)."""
        args = ["fit"]
        for c in self.configs:
            args += ["--config", os.path.relpath(c, relative_to) if relative_to else str(c)]
        return args + override_args(self.overrides)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """``--key=value`` per override. ``--key=value`` (not two tokens) keeps negative numbers from reading as flags;
    non-strings go as JSON (``true``, ``null``, ``{"class_path": ...}``), which jsonargparse parses."""
    return [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]


def merge_overrides(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win, and a key a later layer sets again moves to the end: jsonargparse applies arguments in
    order, so a replaced ``router`` class must come before its ``router.init_args.*``."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            out.pop(k, None)
            out[k] = v
    return out


def _load_yaml(path: Path) -> Any:
    """Parse a YAML file, naming it in the error."""
    import yaml  # PyYAML ships with lightning/jsonargparse; imported here so ``import lightning_moe`` stays light.

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise StudyError(f"{path.name} is not valid YAML: {err}") from err


def _check_keys(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    """Reject unknown keys, listing the valid ones."""
    unknown = set(raw) - allowed
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(allowed)}.")


def _mapping(raw: Any, where: str, example: str) -> dict[str, Any]:
    """``raw`` as a dict (None -> empty), or an error showing ``example``."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise StudyError(f"{where} must be a mapping like {example}, got {type(raw).__name__} {raw!r}.")
    return dict(raw)


def _overrides(raw: Any, where: str) -> dict[str, Any]:
    """A mapping of dotted config keys to values."""
    out = _mapping(raw, where, "{trainer.max_steps: 100}")
    for key in out:
        if not isinstance(key, str) or not key or key.startswith("-"):
            raise StudyError(
                f"{where}: override key {key!r} must be a dotted config key without dashes, "
                f"e.g. 'model.init_args.top_k'."
            )
    return out


def _int_list(raw: Any, where: str) -> tuple[int, ...]:
    """A non-empty list of distinct integers (seeds)."""
    if not isinstance(raw, list) or not raw or any(isinstance(s, bool) or not isinstance(s, int) for s in raw):
        raise StudyError(f"{where} must be a non-empty list of integers like [0, 1, 2], got {raw!r}.")
    if len(set(raw)) != len(raw):
        raise StudyError(f"{where} lists a seed twice: {raw!r}; list each seed once.")
    return tuple(raw)


def _paths(raw: Any, where: str, root: Path) -> tuple[Path, ...]:
    """Config path(s) relative to the study file, resolved and checked to exist."""
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
        raise StudyError(f"{where} must be a config path or a list of them (relative to the study file), got {raw!r}.")
    out = []
    for p in items:
        path = (root / p).resolve()
        if not path.is_file():
            raise StudyError(f"{where}: config {p!r} does not exist (paths are relative to the study file's folder).")
        out.append(path)
    return tuple(out)


def _paper(raw: Any, where: str, metrics: Mapping[str, str]) -> dict[str, PaperValue | None]:
    """A condition's paper numbers: metric -> number, ``{mean, std}`` or null."""
    out: dict[str, PaperValue | None] = {}
    for metric, v in _mapping(raw, where, "{val/loss: 2.31}").items():
        if metric not in metrics:
            raise StudyError(
                f"{where} gives a number for {metric!r}, which is not in metrics; add it to metrics or fix the key "
                f"(metrics: {', '.join(metrics)})."
            )
        if v is None:
            out[metric] = None
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[metric] = PaperValue(float(v))
        elif isinstance(v, Mapping) and set(v) <= {"mean", "std"} and isinstance(v.get("mean"), (int, float)):
            std = v.get("std")
            out[metric] = PaperValue(float(v["mean"]), None if std is None else float(std))
        else:
            raise StudyError(f"{where}.{metric} must be a number, {{mean: x, std: y}} or null, got {v!r}.")
    return out


def _grid_points(raw: Any) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, overrides)]`` for the cartesian product of ``grid``; names use the keys' last parts."""
    grid = _mapping(raw, "grid", "{model.init_args.top_k: [1, 2]}")
    if not grid:
        return []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise StudyError(f"grid.{key} must be a non-empty list of values, got {values!r}.")
        if any(isinstance(v, (Mapping, list)) for v in values):
            raise StudyError(f"grid.{key} takes scalar values only; put structured values in named conditions.")
    shorts = [k.rsplit(".", 1)[-1] for k in grid]
    # Two axes ending in the same word (two ``seed`` keys) would give ambiguous names: fall back to full keys.
    shorts = shorts if len(set(shorts)) == len(shorts) else list(grid)
    points = []
    for combo in itertools.product(*grid.values()):
        name = ",".join(f"{s}={json.dumps(v) if not isinstance(v, str) else v}" for s, v in zip(shorts, combo))
        points.append((name, dict(zip(grid, combo))))
    return points


def _metrics(raw: Any) -> dict[str, str]:
    """Metrics as key -> label, from a list of keys or a mapping."""
    if isinstance(raw, list) and raw and all(isinstance(m, str) for m in raw):
        return {m: m for m in raw}
    if isinstance(raw, Mapping) and raw and all(isinstance(k, str) for k in raw):
        return {k: str(v) if v is not None else k for k, v in raw.items()}
    raise StudyError(
        f"metrics must list the logged keys to collect (e.g. [val/loss]) or map them to labels, got {raw!r}."
    )


def _conditions(raw: Mapping[str, Any], root: Path, metrics: Mapping[str, str]) -> tuple[Condition, ...]:
    """The named conditions, crossed with the grid if there is one, with their paper numbers."""
    listed = raw.get("conditions") or []
    if not isinstance(listed, list):
        raise StudyError(f"conditions must be a list of {{name, overrides}}, got {listed!r}.")
    base: list[Condition] = []
    for i, c in enumerate(listed):
        where = f"conditions[{i}]"
        if not isinstance(c, Mapping) or "name" not in c:
            raise StudyError(f"{where} must be a mapping with at least a 'name', got {c!r}.")
        _check_keys(c, _CONDITION_KEYS, where)
        name = c["name"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise StudyError(
                f"{where}.name {name!r} must start with a letter or digit and use only letters, digits and "
                f"_ . = + , - (it names run folders)."
            )
        configs = _paths(c["configs"], f"{where}.configs", root) if c.get("configs") else ()
        base.append(Condition(
            name, _overrides(c.get("overrides"), f"{where}.overrides"), configs,
            _paper(c.get("paper"), f"{where}.paper", metrics), str(c.get("description", "")),
        ))
    points = _grid_points(raw.get("grid"))
    if points:
        for c in base:
            if c.paper:
                raise StudyError(
                    f"condition {c.name!r} gives paper numbers, but with a grid it becomes several conditions; give "
                    f"them by grid-point name in the study-level 'paper' mapping instead."
                )
        base = [
            Condition(f"{c.name},{p}" if base else p, merge_overrides(c.overrides, o), c.configs, None, c.description)
            for c in (base or [Condition("", {})]) for p, o in points
        ]
        for c in base:  # named conditions were checked above; grid values make new names
            if not _NAME.match(c.name):
                raise StudyError(
                    f"the grid makes a condition named {c.name!r}, which is not a usable folder name; use values of "
                    f"letters, digits and _ . = + , - in grid, or named conditions for structured values."
                )
    names = [c.name for c in base]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StudyError(f"condition name(s) {dupes} appear more than once; give every condition its own name.")
    by_name = {c.name: c for c in base}
    for name, numbers in _mapping(raw.get("paper"), "paper", "{condition: {val/loss: 2.31}}").items():
        if name not in by_name:
            raise StudyError(f"paper names condition {name!r}, which the study does not have; it has {names}.")
        if by_name[name].paper:
            raise StudyError(f"paper numbers for {name!r} are given twice (in the condition and in paper); keep one.")
        c = by_name[name]
        by_name[name] = dataclasses.replace(c, paper=_paper(numbers, f"paper.{name}", metrics))
    return tuple(by_name[n] for n in names)


def load_study(path: str | Path) -> Study:
    """Read and check a study file (or the ``study.yaml`` inside a folder); every error names the field and fix."""
    path = Path(path)
    if path.is_dir():
        path = path / STUDY_FILE
    if not path.is_file():
        raise StudyError(f"no study file at {str(path)!r}; pass a study folder containing {STUDY_FILE} or the file.")
    path = path.resolve()
    raw = _load_yaml(path)
    if not isinstance(raw, Mapping):
        raise StudyError(f"{path.name} must be a YAML mapping with base, seeds, metrics, conditions and claims.")
    _check_keys(raw, _STUDY_KEYS, path.name)
    root = path.parent
    name = raw.get("name", root.name)
    if not isinstance(name, str) or not _NAME.match(name):
        raise StudyError(f"name {name!r} must use only letters, digits and _ . = + , - (it names the output folder).")
    if "base" not in raw:
        raise StudyError(f"{path.name} needs 'base': the LightningCLI config(s) every run starts from.")
    metrics = _metrics(raw.get("metrics"))
    seed_keys = raw.get("seed_keys", ["seed_everything"])
    if not isinstance(seed_keys, list) or not all(isinstance(k, str) for k in seed_keys):
        raise StudyError(f"seed_keys must be a list of dotted keys like [seed_everything], got {seed_keys!r}.")
    smoke = _mapping(raw.get("smoke"), "smoke", "{overrides: {trainer.max_steps: 5}}")
    _check_keys(smoke, _SMOKE_KEYS, "smoke")
    conditions = _conditions(raw, root, metrics)
    if not conditions:
        raise StudyError(f"{path.name} defines no conditions: add a 'conditions' list or a 'grid'.")
    claims = []
    for i, c in enumerate(raw.get("claims") or []):
        try:
            claim = parse_claim(c, f"claims[{i}]")
        except ClaimError as err:
            raise StudyError(str(err)) from None
        for cond in sorted(claim.conditions() - {c.name for c in conditions}):
            raise StudyError(
                f"claims[{i}] ({claim.name!r}) uses condition {cond!r}, which the study does not have; "
                f"conditions: {', '.join(c.name for c in conditions)}."
            )
        for metric in sorted(claim.metrics() - set(metrics)):
            raise StudyError(f"claims[{i}] ({claim.name!r}) uses metric {metric!r}; add it to metrics or fix the key.")
        claims.append(claim)
    return Study(
        path=path, name=name, title=str(raw.get("title", name)), description=str(raw.get("description", "")),
        reference=str(raw.get("reference") or ""), base=_paths(raw["base"], "base", root),
        overrides=_overrides(raw.get("overrides"), "overrides"), seeds=_int_list(raw.get("seeds"), "seeds"),
        seed_keys=tuple(seed_keys), metrics=metrics, conditions=conditions, claims=tuple(claims),
        smoke_seeds=_int_list(smoke["seeds"], "smoke.seeds") if "seeds" in smoke else None,
        smoke_overrides=_overrides(smoke.get("overrides"), "smoke.overrides"),
        sections=_sections(raw.get("sections")),
        paper_tables=dict(_mapping(raw.get("paper_tables"), "paper_tables", "{cosine: {L0: 0.32}}")),
        companions=_companions(raw.get("companions"), root),
    )


def _companions(raw: Any, root: Path) -> tuple[Path, ...]:
    """Study folders (relative to this one) run and reported with it, each holding its own study file."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise StudyError(f"companions must be a list of study folders relative to the study file, got {raw!r}.")
    out = []
    for c in raw:
        folder = (root / c).resolve()
        if not (folder / STUDY_FILE).is_file():
            raise StudyError(f"companions: {c!r} has no {STUDY_FILE} (folders are relative to the study file's).")
        out.append(folder)
    return tuple(out)


def _sections(raw: Any) -> str:
    """``package.module:function`` of a study's extra report sections ('' when none); checked when the report is
    written, so a study file parses without importing its report code."""
    if raw is None:
        return ""
    if not isinstance(raw, str) or not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", raw):
        raise StudyError(
            f"sections must be 'package.module:function', e.g. 'lightning_moe.studies.transitions.section:render', "
            f"got {raw!r}."
        )
    return raw


def _fingerprint(configs: Sequence[Path], overrides: Mapping[str, Any]) -> str:
    """Hash of the config files' contents and the overrides: what decides a run's result."""
    h = hashlib.sha256()
    for c in configs:
        h.update(c.read_bytes())
    h.update(json.dumps(overrides, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def plan_runs(
    study: Study, smoke: bool = False, seeds: Sequence[int] | None = None, conditions: Sequence[str] | None = None,
) -> list[RunPlan]:
    """Every (condition, seed) run, condition-major. ``seeds`` replaces the study's (or smoke's) seeds;
    ``conditions`` keeps only the named ones. Raises :class:`StudyError` when nothing is left to run."""
    if conditions:
        unknown = sorted(set(conditions) - {c.name for c in study.conditions})
        if unknown:
            raise StudyError(
                f"--conditions names {unknown}, which the study does not have; choose from "
                f"{', '.join(c.name for c in study.conditions)}."
            )
    chosen = [c for c in study.conditions if not conditions or c.name in conditions]
    default_seeds = study.smoke_seeds if smoke and study.smoke_seeds else study.seeds
    run_seeds = tuple(seeds) if seeds is not None else default_seeds
    if not chosen or not run_seeds:
        raise StudyError(
            f"study {study.name!r} produces no runs (conditions: {[c.name for c in chosen]}, "
            f"seeds: {list(run_seeds)}); give at least one condition and one seed."
        )
    plans = []
    for c in chosen:
        configs = study.base + c.configs
        for seed in run_seeds:
            overrides = merge_overrides(
                study.overrides, c.overrides, {k: seed for k in study.seed_keys},
                study.smoke_overrides if smoke else {},
            )
            plans.append(RunPlan(f"{c.name}__seed{seed}", c.name, seed, configs, overrides,
                                 _fingerprint(configs, overrides)))
    return plans
