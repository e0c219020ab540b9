"""A study's report: per condition mean ± std over seeds beside the paper's number, every claim with its verdict and
the numbers that decide it, plots, the hardware and the wall time, rebuilt from the rows file alone.

The full report is ``REPORT.md`` (plots in ``plots/``) next to the study file; a smoke report goes to the smoke
output folder instead and says on its first lines that it is a smoke run, so it never replaces the full report.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import math
import os
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_moe.studies.claims import Lookup, Verdict, evaluate, resolution, seed_agreement, size_vs_paper
from lightning_moe.studies.runner import RECORDS_DIR, StudyPaths, read_rows
from lightning_moe.studies.spec import PaperValue, RunPlan, Study, StudyError

REPORT_FILE = "REPORT.md"
PLOTS_DIR = "plots"
_DASH = "—"


@dataclass(frozen=True)
class Results:
    """The rows that belong to the current plan: ``ok`` (finished, same fingerprint) and ``problems`` (the latest
    failed or rejected row of each run that has no good one), plus the planned runs with no row at all."""

    plans: tuple[RunPlan, ...]
    ok: dict[str, dict[str, Any]]
    problems: dict[str, dict[str, Any]]
    missing: tuple[str, ...]

    @classmethod
    def of(cls, plans: Sequence[RunPlan], rows: Sequence[Mapping[str, Any]]) -> Results:
        """Sort ``rows`` (oldest first) against ``plans``; rows of other runs or older fingerprints are ignored."""
        good: dict[str, dict[str, Any]] = {}
        bad: dict[str, dict[str, Any]] = {}
        fingerprints = {p.run_id: p.fingerprint for p in plans}
        for r in rows:  # oldest first, so later rows replace earlier ones
            rid = r.get("run_id")
            if rid not in fingerprints or r.get("fingerprint") != fingerprints[rid]:
                continue
            if r.get("status") == "ok":
                good[rid] = dict(r)
                bad.pop(rid, None)
            elif rid not in good:
                bad[rid] = dict(r)
        missing = tuple(p.run_id for p in plans if p.run_id not in good and p.run_id not in bad)
        return cls(tuple(plans), good, bad, missing)

    def values(self, condition: str, metric: str) -> dict[int, float]:
        """seed -> the metric's final value, over the finished runs of ``condition`` that logged it."""
        return {
            r["seed"]: float(r["metrics"][metric]) for r in self.ok.values()
            if r["condition"] == condition and metric in r["metrics"]
        }

    def seeds(self) -> list[int]:
        """The planned seeds, sorted."""
        return sorted({p.seed for p in self.plans})

    def conditions(self) -> list[str]:
        """The planned conditions, in study order."""
        return list(dict.fromkeys(p.condition for p in self.plans))


@dataclass(frozen=True)
class ClaimRow:
    """One line of the claims table."""

    name: str
    ours: Verdict  # on the means over seeds; "not resolved" when the seeds' spread cannot tell (claims.resolution)
    seeds: str  # "k/n": the seeds in which it holds on that seed's own numbers
    paper: Verdict  # the same claim on the paper's numbers
    size: tuple[bool, str] | None  # claims.size_vs_paper: (within the band, text), None without paper numbers


@dataclass(frozen=True)
class ReportContext:
    """What a study's ``sections`` function (``study.yaml: sections: package.module:function``) gets. It returns
    Markdown lines, placed after the claims. Runs leave per-run artifacts (curves, matrices) in their own folder,
    :meth:`run_dir`; plots go to :meth:`plot` paths and are linked by :meth:`link`."""

    study: Study
    results: Results
    paths: StudyPaths
    report_dir: Path
    smoke: bool
    claims: list[ClaimRow] = field(default_factory=list)  # what the sections decide, see claim()

    def claim(self, name: str, holds: bool, detail: str) -> None:
        """A claim the section decides from its own analysis (a fit, a spread over model shapes) rather than from
        the study file: it joins the claims table and its count, without per-seed or paper columns."""
        self.claims.append(ClaimRow(name, Verdict("holds" if holds else "fails", detail), _DASH, Verdict("n/a", ""),
                                    None))

    def paper_table(self, name: str) -> Any:
        """The study file's ``paper_tables[name]``; a :class:`StudyError` naming the file when it is missing."""
        if name not in self.study.paper_tables:
            raise StudyError(
                f"{self.study.path.name} has no paper_tables.{name}, which its sections ({self.study.sections}) "
                f"read; add it (paper_tables: {sorted(self.study.paper_tables)})."
            )
        return self.study.paper_tables[name]

    def run_dir(self, run_id: str) -> Path:
        """The run's ``trainer.default_root_dir``."""
        return self.paths.run_dir(run_id)

    def runs(self, condition: str) -> list[dict[str, Any]]:
        """The finished rows of ``condition``, by seed."""
        return sorted((r for r in self.results.ok.values() if r["condition"] == condition), key=lambda r: r["seed"])

    def artifact(self, run_id: str, name: str) -> Any:
        """The JSON file ``name`` a run wrote into its folder, parsed; None when the run did not write it."""
        path = self.run_dir(run_id) / name
        return json.loads(path.read_text()) if path.is_file() else None

    def plot(self, name: str) -> Path:
        """Where to save the plot ``name`` (a file name with its suffix); the folder exists."""
        path = self.report_dir / PLOTS_DIR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def link(self, path: Path, alt: str) -> str:
        """A Markdown image line for a saved plot."""
        return f"![{alt}]({path.relative_to(self.report_dir).as_posix()})"


def study_sections(ctx: ReportContext) -> list[str]:
    """Call the study's ``sections`` function, if it names one; an unimportable one is a :class:`StudyError`."""
    if not ctx.study.sections:
        return []
    module, _, name = ctx.study.sections.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise StudyError(
            f"sections {ctx.study.sections!r} in {ctx.study.path.name} cannot be loaded ({err}); name an importable "
            f"'package.module:function'."
        ) from err
    return list(fn(ctx))


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (n - 1); std is None below two values, both None for none."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _num(x: float) -> str:
    """Four significant digits."""
    return f"{x:.4g}"


def mean_std_text(mean: float | None, std: float | None) -> str:
    """``mean ± std``, the mean alone for one seed, a dash for none."""
    if mean is None:
        return _DASH
    # Two significant digits of spread are all that two to five seeds can support.
    return _num(mean) if std is None or math.isnan(std) else f"{_num(mean)} ± {std:.2g}"


def _paper_text(value: PaperValue | None) -> str:
    """The paper's number as the report shows it."""
    return _DASH if value is None else mean_std_text(value.mean, value.std)


def _cell(text: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(_cell, r)) + " |" for r in rows]


def _code(overrides: Mapping[str, Any]) -> str:
    """Overrides as inline code, ``key=value`` each."""
    if not overrides:
        return "(base config)"
    return ", ".join(f"`{k}={v if isinstance(v, str) else json.dumps(v)}`" for k, v in overrides.items())


def _ours(results: Results) -> Lookup:
    """Claim lookup: our mean over the finished seeds."""
    def lookup(condition: str, metric: str) -> float | None:
        return mean_std(list(results.values(condition, metric).values()))[0]

    return lookup


def _paper(study: Study) -> Lookup:
    """Claim lookup: the paper's number."""
    def lookup(condition: str, metric: str) -> float | None:
        value = study.paper_value(condition, metric)
        return None if value is None else value.mean

    return lookup


def _one_seed(results: Results, seed: int) -> Lookup:
    """Claim lookup: one seed's own number."""
    def lookup(condition: str, metric: str) -> float | None:
        return results.values(condition, metric).get(seed)

    return lookup


def _slug(metric: str) -> str:
    """A file-name-safe form of a metric key (``val/loss`` -> ``val_loss``)."""
    return "".join(ch if ch.isalnum() else "_" for ch in metric).strip("_")


def figure(width: float, height: float):
    """A matplotlib ``Figure`` with an Agg canvas: the object API touches no global pyplot state or backend, so
    reports can be drawn from any process (matplotlib is the optional ``plots`` extra)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_metric(study: Study, results: Results, metric: str, path: Path) -> bool:
    """One PNG: each condition's seeds (dots), mean ± std (bar) and the paper's number (red diamond, with its std
    where the paper gives one). False when there is nothing to plot. Uses matplotlib's object API, so no global
    pyplot state or backend is touched."""
    conditions = results.conditions()
    per = [results.values(c, metric) for c in conditions]
    if not any(per):
        return False
    fig = figure(max(4.0, 0.8 * len(conditions) + 2.0), 3.4)
    ax = fig.add_subplot()
    label = "ours, one seed"  # on the first condition with values only, so the legend lists it once
    for i, vals in enumerate(per):
        if vals:
            ax.scatter([i] * len(vals), list(vals.values()), s=12, color="0.35", zorder=3, label=label)
            label = None
    stats = [mean_std(list(v.values())) for v in per]
    xs = [i for i, (m, _) in enumerate(stats) if m is not None]
    ax.errorbar(xs, [stats[i][0] for i in xs], yerr=[stats[i][1] or 0.0 for i in xs], fmt="_", markersize=18,
                capsize=4, color="tab:blue", zorder=4, label="ours, mean ± std")
    paper = [(i, v.mean, v.std or 0.0) for i, c in enumerate(conditions)
             if (v := study.paper_value(c, metric)) is not None]
    if paper:
        xs_p, ys_p, err_p = zip(*paper)
        ax.errorbar(xs_p, ys_p, yerr=err_p, fmt="D", color="tab:red", capsize=3, zorder=5, label="paper")
    ax.set_xticks(range(len(conditions)), conditions, rotation=30 if len(conditions) > 3 else 0,
                  ha="right" if len(conditions) > 3 else "center")
    ax.set_xlim(-0.6, len(conditions) - 0.4)
    ax.set_ylabel(metric)
    ax.set_title(textwrap.fill(study.metrics[metric], 45), fontsize=10)  # tight_layout does not shrink titles
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


def _hardware_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per distinct machine and worker setting the finished runs ran with."""
    seen: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        hw = r.get("hardware") or {}
        key = json.dumps([hw, r.get("workers"), r.get("threads")], sort_keys=True)
        seen.setdefault(key, r)
    lines = []
    for r in seen.values():
        hw = r.get("hardware") or {}
        accel = f", {hw['accelerator']}" if hw.get("accelerator") else ""
        lines.append(
            f"- {hw.get('cpu', '?')}, {hw.get('cores', '?')} cores ({hw.get('usable_cores', '?')} usable){accel}; "
            f"{hw.get('system', '?')}, Python {hw.get('python', '?')}, torch {hw.get('torch', '?')}, "
            f"lightning {hw.get('lightning', '?')}; {r.get('workers', '?')} parallel run(s) x "
            f"{r.get('threads', '?')} torch thread(s)"
        )
    return lines or ["- (no finished runs)"]


def run_seconds(rows: Sequence[Mapping[str, Any]]) -> float:
    """The runs' wall times summed."""
    return sum(r.get("wall_s", 0.0) for r in rows)


def _wall_lines(rows: Sequence[Mapping[str, Any]], companions_run_s: float = 0.0) -> list[str]:
    """Summed run time (with the companion studies' when there are any) and first-start-to-last-finish span."""
    if not rows:
        return []
    total = run_seconds(rows)
    starts = [dt.datetime.fromisoformat(r["started"]) for r in rows if r.get("started")]
    ends = [dt.datetime.fromisoformat(r["finished"]) for r in rows if r.get("finished")]
    lines = [f"- total wall time of the runs: {total:,.0f} s ({total / 60:.1f} min, summed over runs)"]
    if starts and ends:
        span = (max(ends) - min(starts)).total_seconds()
        lines.append(f"- first start to last finish: {span:,.0f} s ({span / 60:.1f} min; includes any pauses "
                     f"between resumed invocations)")
    if companions_run_s:
        whole = total + companions_run_s
        lines.append(f"- with the companion studies: {whole:,.0f} s ({whole / 60:.1f} min summed over runs; "
                     f"about {whole / 120:.1f} min on two cores, two runs at a time)")
    return lines


def claim_verdicts(study: Study, results: Results) -> list[ClaimRow]:
    """Every claim of the study, checked on our numbers, per seed, for noise and beside the paper."""
    seeds = results.seeds()
    by_seed = {s: _one_seed(results, s) for s in seeds}
    mean, paper = _ours(results), _paper(study)
    out = []
    for claim in study.claims:
        holds, decided = seed_agreement(claim, seeds, by_seed.__getitem__)
        ours = evaluate(claim, mean)
        why = resolution(claim, list(by_seed.values())) if ours.status != "n/a" else None
        if why is not None:
            ours = Verdict("not resolved", f"{ours.detail}; not resolved at our scale: {why}", ours.numbers)
        name = claim.name + (f" ({claim.note})" if claim.note else "")
        out.append(ClaimRow(name, ours, f"{holds}/{decided}", evaluate(claim, paper),
                            size_vs_paper(claim, mean, paper)))
    return out


def claims_line(rows: Sequence[ClaimRow]) -> str:
    """"n claims: a hold, b fail, ... ; c of the d with a paper number are the paper's size": the table's summary."""
    counts = {s: sum(r.ours.status == s for r in rows) for s in ("holds", "fails", "not resolved", "n/a")}
    sized = [r.size[0] for r in rows if r.size is not None]
    line = (f"{len(rows)} claims: {counts['holds']} hold, {counts['fails']} fail, {counts['not resolved']} not "
            f"resolved at our scale (within the seeds' noise), {counts['n/a']} cannot be decided (a number is missing)")
    if sized:
        line += f"; {sum(sized)} of the {len(sized)} with a paper number are within its size band"
    return line


def _claims_section(rows: Sequence[ClaimRow]) -> list[str]:
    out = ["## Claims", ""]
    if not rows:
        return out + ["The study states no claims.", ""]
    out += [f"{claims_line(rows)}. Verdicts use the means over seeds, and a claim whose deciding number lies within "
            "one seed std of its bound is *not resolved* rather than held or failed; `seeds` counts the seeds in "
            "which it holds on that seed's own numbers; `size vs paper` sets our deciding number beside the paper's "
            "(ours / paper, band 0.5-2x unless the claim states one); `paper` checks the claim on the paper's "
            "numbers.", ""]
    out += markdown_table(
        ["claim", "verdict", "deciding numbers (ours)", "seeds", "size vs paper", "paper"],
        [(r.name,
          f"**{r.ours.status.upper() if r.ours.status in ('fails', 'not resolved') else r.ours.status}**",
          r.ours.detail, r.seeds,
          _DASH if r.size is None else f"{'within' if r.size[0] else '**outside**'}: {r.size[1]}",
          r.paper.status if r.paper.status == "n/a" else f"{r.paper.status}: {r.paper.detail}")
         for r in rows],
    )
    return out + [""]


def _paper_vs_ours(study: Study, results: Results) -> list[str]:
    """Every (condition, metric) the paper gives a number for: ours beside it, with the ratio."""
    rows = []
    for c in results.conditions():
        for m, label in study.metrics.items():
            paper = study.paper_value(c, m)
            ours_mean, ours_std = mean_std(list(results.values(c, m).values()))
            if paper is None:
                continue
            ratio = f"{ours_mean / paper.mean:.2f}" if ours_mean is not None and paper.mean else _DASH
            rows.append([c, label, mean_std_text(ours_mean, ours_std), _paper_text(paper), ratio])
    if not rows:
        return []
    return ["## Ours beside the paper", "", "Every number the paper gives, beside ours (mean ± std over seeds).", ""] + \
        markdown_table(["condition", "metric", "ours", "paper", "ours / paper"], rows) + [""]


def render(
    study: Study, results: Results, smoke: bool, out_dir: str, plots: Mapping[str, str], plot_note: str = "",
    sections: Sequence[str] = (), companions: Sequence[str] = (), claims: Sequence[ClaimRow] = (),
    companions_run_s: float = 0.0,
) -> str:
    """The report's Markdown; ``out_dir`` is the output folder and ``plots`` maps metric -> image path, both
    relative to the report; ``sections`` are the study's own Markdown lines, placed after the claims;
    ``companions_run_s`` is the companion studies' summed run time, added to this study's in the time lines."""
    ok_rows = list(results.ok.values())
    seeds = results.seeds()
    out = [f"# {study.title}", ""]
    if smoke:
        out += [
            "> **SMOKE RUN.** Every run was scaled down by the study's `smoke` overrides to test the pipeline. "
            "These numbers are not results and say nothing about the paper's claims.", "",
        ]
    if study.description:
        out += [study.description.strip(), ""]
    out += [
        f"Study `{study.name}`: {len(results.conditions())} condition(s) x {len(seeds)} seed(s) "
        f"({', '.join(map(str, seeds))}) = {len(results.plans)} runs; {len(results.ok)} finished, "
        f"{len(results.problems)} failed or rejected, {len(results.missing)} not run yet.",
        f"Paper numbers: {study.reference or 'none (this is not a paper study)'}.",
        "Claims are checked as written in the study file; a claim that does not hold at our scale is reported as "
        "failing, and one our seeds cannot tell apart as not resolved, with its numbers. Nothing was tuned to make "
        "a claim pass.",
        "",
    ]
    out += _claims_section(claims)
    out += _paper_vs_ours(study, results)
    out += list(companions)
    out += ["## Conditions", ""]
    shown = [c for c in study.conditions if c.name in results.conditions()]
    described = any(c.description for c in shown)
    out += markdown_table(["condition", "overrides (on top of the base config)"] + (["description"] if described else []),
                  [[c.name, _code(c.overrides)] + ([c.description] if described else []) for c in shown])
    extra = [f"every condition also gets {_code(study.overrides)}"] if study.overrides else []
    if smoke:
        extra.append(f"for this smoke run {_code(study.smoke_overrides)}")
    out += ["", f"Base config(s): {', '.join(f'`{os.path.relpath(b, study.dir)}`' for b in study.base)}"
            + "".join(f"; {e}" for e in extra) + ".", ""]

    # The full table is wide (two columns per metric): folded, the headline tables above say what matters.
    out += ["## Results", "", "<details><summary>Every metric: final logged value, mean ± std (sample std) over the "
            f"finished seeds, beside the paper's number for the same condition ({_DASH} = none)</summary>", ""]
    header = ["condition", "n"]
    for m in study.metrics:
        header += [m, "paper"]
    table = []
    for c in results.conditions():
        n = sum(1 for r in ok_rows if r["condition"] == c)
        row: list[Any] = [c, n]
        for m in study.metrics:
            row += [mean_std_text(*mean_std(list(results.values(c, m).values()))),
                    _paper_text(study.paper_value(c, m))]
        table.append(row)
    out += markdown_table(header, table)
    out += ["", "Metrics: " + "; ".join(f"`{k}` = {v}" for k, v in study.metrics.items()) + ".", "", "</details>", ""]

    out += list(sections)
    if plots or plot_note:
        out += ["## Plots", ""]
        out += [f"![{m}]({p})" for m, p in plots.items()]
        out += ([plot_note] if plot_note else []) + [""]

    problems = list(results.problems.values())
    if problems or results.missing:
        out += ["## Problems", ""]
        if problems:
            out += markdown_table(["run", "status", "error", "overrides", "log"],
                          [(r["run_id"], r["status"], r.get("error") or "", _code(r.get("overrides", {})),
                            r.get("log", "")) for r in problems])
            out.append("")
        if results.missing:
            out += [f"Not run yet: {', '.join(results.missing)}.", ""]

    if out_dir == RECORDS_DIR:
        where = (f"The rows file and the per-run files the sections read are in `{RECORDS_DIR}/` (`lightning-moe study "
                 "report` rebuilds this report from them); logs and checkpoints stay with the runs that made them, "
                 "log paths are relative to their output folder.")
    else:
        where = (f"Logs, resolved configs and the rows file are in "
                 f"{'this folder' if out_dir == '.' else f'the output folder `{out_dir}`'}; log paths are relative to it.")
    out += ["## Runs", "", where, ""]
    header = ["run", "seed", "wall s", "steps"] + list(study.metrics) + ["log"]
    rows = [[r["run_id"], r["seed"], f"{r.get('wall_s', 0):.1f}", r.get("global_step", "")]
            + [_num(r["metrics"][m]) if m in r["metrics"] else _DASH for m in study.metrics] + [r.get("log", "")]
            for r in sorted(ok_rows, key=lambda r: (results.conditions().index(r["condition"]), r["seed"]))]
    out += markdown_table(header, rows)
    out += ["", "## Hardware and time", ""] + _hardware_lines(ok_rows) + _wall_lines(ok_rows, companions_run_s)
    # The rows' latest finish, not the clock: the same rows give the same report, byte for byte.
    finished = max((r["finished"] for r in ok_rows if r.get("finished")), default=None)
    stamp = f" (last run finished {dt.datetime.fromisoformat(finished):%Y-%m-%d %H:%M} UTC)" if finished else ""
    out += ["", f"_Generated by `lightning-moe study report{' --smoke' if smoke else ''}` from the rows "
            f"file{stamp}._", ""]
    return "\n".join(out)


def write_report(
    study: Study, plans: Sequence[RunPlan], paths: StudyPaths, smoke: bool = False, companions: Sequence[str] = (),
    companions_run_s: float = 0.0,
) -> tuple[Path, list[ClaimRow], float]:
    """Write the report (and its plots) for ``plans`` from ``paths.rows``; return its path, its claims and its
    finished runs' summed wall time. ``companions`` are Markdown lines summarising the companion studies, placed
    after the headline tables, and ``companions_run_s`` their summed run time."""
    rows = read_rows(paths.rows)
    if not rows:
        raise StudyError(
            f"no runs recorded in {paths.rows}; run `lightning-moe study run{' --smoke' if smoke else ''}` first "
            f"(or pass the --out folder the runs were written to)."
        )
    results = Results.of(plans, rows)
    report_dir = paths.report_dir
    report = report_dir / REPORT_FILE
    plots: dict[str, str] = {}
    note = ""
    try:
        import matplotlib  # noqa: F401  (optional: the `plots` extra)
    except ImportError:
        note = "Plots skipped: matplotlib is not installed (`pip install lightning-moe[plots]`)."
    else:
        for metric in study.metrics:
            path = report_dir / PLOTS_DIR / f"{_slug(metric)}.png"
            if plot_metric(study, results, metric, path):
                plots[metric] = path.relative_to(report_dir).as_posix()
    report_dir.mkdir(parents=True, exist_ok=True)
    out_dir = RECORDS_DIR if paths.records else Path(os.path.relpath(paths.root.resolve(), report_dir.resolve())).as_posix()
    ctx = ReportContext(study, results, paths, report_dir, smoke)
    sections = study_sections(ctx) if results.ok else []
    claims = claim_verdicts(study, results) + ctx.claims
    report.write_text(render(study, results, smoke, out_dir, plots, note, sections, companions, claims,
                             companions_run_s))
    return report, claims, run_seconds(list(results.ok.values()))


def companions_section(parent_dir: Path, reports: Sequence[tuple[Study, Path, str, float]]) -> list[str]:
    """The parent report's table of its companion studies: title, claims verdicts, summed run time, link to each
    report."""
    if not reports:
        return []
    rows = [[study.title, line, f"{run_s / 60:.1f}",
             f"[{os.path.relpath(report, parent_dir)}]({os.path.relpath(report, parent_dir)})"]
            for study, report, line, run_s in reports]
    return ["## Companion studies", "", "Run and reported with this study (`lightning-moe study run` on this folder "
            "runs them all); the whole study's run time is under *Hardware and time*.", ""] + markdown_table(
        ["study", "claims", "run time (min, summed over runs)", "report"], rows) + [""]
