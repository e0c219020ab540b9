"""Report sections of the domain-transition studies (``recipes/transitions`` and its ``lm/``), built from the
finished rows and the ``transition_curve.json`` the recipes' :class:`~lightning_moe.callbacks.TransitionMonitor` writes:
paired gains and the beta x Ant interaction per seed, p(correct expert) aligned on the transition step, and the
wall time beside the reference prototypes' measured time (transitions spec §6).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from datetime import datetime

from lightning_moe.studies.artifacts import PRECISION_FILE
from lightning_moe.studies.report import ReportContext, figure

CURVE_FILE = "transition_curve.json"  # the TransitionMonitor's artifact in each run's folder

# The reference prototypes' uncontended fit time per run on the same 2-core VM (spec §6), seconds: the toy's
# baseline and beta+Ant were timed alone (30.0 s, 33.6 s); its other conditions only within the whole 45-run
# ablation (27 min 33 s, so 36.7 s per run on average); the LM: 270 s Standard, 304 s beta, ~540 s beta+Ant
# (extrapolated from an uncontended 150-step slice). The reference ran the random-switch variants only as probes.
REFERENCE_S = {
    "transitions": {"*": 1653.0 / 45, "baseline": 30.0, "beta+ant": 33.6},
    "transitions_lm": {"standard": 270.0, "beta": 304.0, "beta+ant": 540.0},
    "transitions_precision": {"*": 28.0 / 4},  # precision_gating.py: 28 s for its 4 runs
}
REFERENCE_TOTAL_S = {  # the reference's whole protocol, seconds: the measured ablation; the LM's 5 seeds
    "transitions": ("the 45-run ablation.py, measured", 1653.0),
    "transitions_lm": ("5 seeds x (270 + 304 + 540) s", 5 * sum(REFERENCE_S["transitions_lm"].values())),
}
TOY_METRIC = "train/transition/router/acc_correct@-1"  # logged by the recipes' TransitionMonitor


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.3f} ± {std:.3f}"


def _paired(ctx: ReportContext, condition: str, base: str, metric: str) -> dict[int, float]:
    """``value(condition) - value(base)`` per seed both finished."""
    left, right = ctx.results.values(condition, metric), ctx.results.values(base, metric)
    return {seed: left[seed] - right[seed] for seed in sorted(left.keys() & right.keys())}


def paired_section(ctx: ReportContext, prefix: str = "") -> list[str]:
    """Gains in acc@transition over the same seed's baseline and the per-seed beta x Ant interaction."""
    base = prefix + "baseline"
    conditions = [c for c in ctx.results.conditions() if c.startswith(prefix) and c != base
                  and (prefix or not c.startswith("random."))]
    title = "random switch position" if prefix else "fixed switch position (the paper's protocol)"
    lines = [f"### Paired gains in acc@transition vs baseline, {title}", "",
             "| condition | gain per seed | mean ± sample std |", "|---|---|---|"]
    for condition in conditions:
        gains = _paired(ctx, condition, base, TOY_METRIC)
        per_seed = ", ".join(f"{g:+.3f}" for g in gains.values())
        lines.append(f"| {condition} | {per_seed or '—'} | {_mean_std(list(gains.values()))} |")
    ba, b, a = (_paired(ctx, prefix + c, base, TOY_METRIC) for c in ("beta+ant", "beta", "ant"))
    seeds = sorted(ba.keys() & b.keys() & a.keys())
    interaction = [ba[s] - b[s] - a[s] for s in seeds]
    interaction_paper = ctx.paper_table("interaction")
    paper = f"spec 7.3 probe of the reference: {interaction_paper['random']}" if prefix else (
        f"paper {interaction_paper['mean']:+.3f} ± {interaction_paper['std']:.3f}")
    per_seed = ", ".join(f"{v:+.3f}" for v in interaction) or "—"
    summary = (f"beta x Ant interaction = gain(beta+Ant) - gain(beta) - gain(Ant), per seed: {per_seed}; "
               f"mean ± std {_mean_std(interaction)} ({paper}).")
    lines += ["", summary, ""]
    return lines


def _held_out(ctx: ReportContext, row: dict) -> dict | None:
    """The held-out results of the run's (single) routed layer in its ``transition_curve.json``, or None."""
    art = ctx.artifact(row["run_id"], CURVE_FILE)
    layers = (art or {}).get("val") or {}
    return next(iter(layers.values()), None)


def _bpc_curve(row: dict) -> tuple[list[int], list[float]]:
    """The char LM's logged ``val/bpc@<o>`` (o from the transition step), on offsets from the switch."""
    found = sorted((int(k.split("@")[1]), v) for k, v in row["metrics"].items() if k.startswith("val/bpc@"))
    return [o - 1 for o, _ in found], [v for _, v in found]


def _curves(ctx: ReportContext, condition: str) -> dict[str, tuple[list[int], list[float]]]:
    """Seed-mean curves of ``condition``, each as (offsets from the switch, values): ``p_correct`` and
    ``acc_correct`` from the monitor's artifact, ``bpc`` from the char LM's logged values."""
    per_seed: dict[str, list[tuple[list[int], list]]] = {}
    for row in ctx.runs(condition):
        held_out = _held_out(ctx, row)
        if held_out is not None:
            for key in ("p_correct", "acc_correct"):
                per_seed.setdefault(key, []).append((held_out["offsets"], held_out[key]))
        offsets, bpc = _bpc_curve(row)
        if bpc:
            per_seed.setdefault("bpc", []).append((offsets, bpc))
    out = {}
    for key, curves in per_seed.items():
        columns = zip(*(values for _, values in curves))
        out[key] = (curves[0][0], [statistics.fmean(v for v in col if v is not None)
                                   if any(v is not None for v in col) else float("nan") for col in columns])
    return out


def curve_section(ctx: ReportContext, groups: dict[str, list[str]], keys: Sequence[str]) -> list[str]:
    """One figure per key with a panel per group: the seed-mean curve of each condition vs offset from the
    switch."""
    legend = ("Offset 0 = each sequence's first input of the new domain, so offset -1 is its transition step (the "
              "input is still the old domain, the target already the new one); held-out batches, mean over seeds. "
              "`p_correct` = the gate's probability on the *incoming* domain's expert at every offset (before the "
              "switch: how early the router moves), the TransitionMonitor's definition; toy: the target experts "
              "0 / 2, character task: the expert whose mean gate rises most on each domain. `bpc` = bits per "
              "character at each offset.")
    lines = ["## Routing aligned on the switch", "", legend, ""]
    for key in keys:
        fig = figure(4.2 * len(groups), 3.2)
        drawn = 0
        for i, (group, conditions) in enumerate(groups.items()):
            ax = fig.add_subplot(1, len(groups), i + 1)
            for condition in conditions:
                curve = _curves(ctx, condition).get(key)
                if curve:
                    ax.plot(*curve, marker="o", ms=3, label=condition)
                    drawn += 1
            ax.axvline(-1, color="grey", lw=0.8, ls="--")
            ax.set_xlabel("offset from the switch (-1 = transition step)")
            ax.set_ylabel(key)
            ax.set_title(group, fontsize=9)
            ax.legend(fontsize=7)
        if not drawn:
            continue
        fig.tight_layout()
        path = ctx.plot(f"{ctx.study.name}_{key}.png")
        fig.savefig(path, dpi=110)
        lines += [ctx.link(path, f"{key} vs offset from the switch"), ""]
    return lines


def specialisation_section(ctx: ReportContext) -> list[str]:
    """The B expert's mean gate on B tokens over its mean gate on A tokens (held out), per condition."""
    lines = ["## B-expert specialisation", "",
             "Mean gate of the B expert (the one whose mean gate rises most on B) on B-domain inputs over its mean "
             "gate on A-domain inputs, held out, from the TransitionMonitor's per-domain routing mass; mean ± "
             "sample std over seeds.", "", "| condition | B / A gate of the B expert |", "|---|---|"]
    for condition in ctx.results.conditions():
        ratios = []
        for row in ctx.runs(condition):
            held_out = _held_out(ctx, row)
            if held_out is not None and held_out["correct_C"][1] >= 0 and held_out["label_mass_CE"][0]:
                b = held_out["correct_C"][1]
                ratios.append(held_out["label_mass_CE"][1][b] / max(held_out["label_mass_CE"][0][b], 1e-12))
        std = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        lines.append(f"| {condition} | {f'{statistics.fmean(ratios):.2f} ± {std:.2f}' if ratios else '—'} |")
    return lines + [""]


def time_section(ctx: ReportContext) -> list[str]:
    """Fit time per condition beside the reference, the sum over the reference's protocol and the study's wall."""
    reference = REFERENCE_S.get(ctx.study.name, {})
    rows = [r for c in ctx.results.conditions() for r in ctx.runs(c) if r.get("fit_s")]
    if not rows:
        return []
    workers = max(r.get("workers", 1) for r in rows)
    threads = max(r.get("threads", 1) for r in rows)
    legend = (f"Fit time per run (Lightning `fit` including the final held-out evaluation; {threads} torch "
              f"thread(s) per run, {workers} run(s) at a time on this machine's cores), beside the reference "
              "prototype's uncontended time per run on the same 2-core machine (spec §6; the reference ran on both "
              "cores). Times on a shared machine also measure the neighbours.")
    lines = ["## Wall time", "", legend, "",
             "| condition | runs | fit s / run (mean, min) | reference s / run | speed-up (mean) |", "|---|---|---|---|---|"]
    ours_ref = theirs = 0.0
    for condition in ctx.results.conditions():
        times = [r["fit_s"] for r in ctx.runs(condition) if r.get("fit_s")]
        if not times:
            continue
        ref = None if condition.startswith("random.") else reference.get(condition, reference.get("*"))
        if ref:
            ours_ref, theirs = ours_ref + sum(times), theirs + ref * len(times)
        speed = f"{ref / statistics.fmean(times):.1f}x" if ref else "—"
        lines.append(f"| {condition} | {len(times)} | {statistics.fmean(times):.1f}, {min(times):.1f} | "
                     f"{f'{ref:.1f}' if ref else '—'} | {speed} |")
    starts = [datetime.fromisoformat(r["started"]) for r in rows if r.get("started")]
    ends = [datetime.fromisoformat(r["finished"]) for r in rows if r.get("finished")]
    lines.append("")
    if theirs:
        lines.append(f"Conditions with a reference time: sum of our fit times {ours_ref / 60:.1f} min vs "
                     f"{theirs / 60:.1f} min for the reference's runs ({theirs / ours_ref:.1f}x, one run at a time "
                     "against one run at a time).")
    total = REFERENCE_TOTAL_S.get(ctx.study.name)
    if total and starts and ends:
        wall = (max(ends) - min(starts)).total_seconds()
        extra = sum(1 for r in rows if r["condition"].startswith("random."))
        lines.append(f"Whole study: {len(rows)} runs ({extra} of them random-switch variants the reference did not "
                     f"run) in {wall / 60:.1f} min wall, first start to last end, {workers} at a time; the "
                     f"reference's protocol ({total[0]}) took {total[1] / 60:.1f} min ({total[1] / wall:.1f}x).")
    return lines + [""]


def _trajectory(ctx: ReportContext, condition: str) -> dict | None:
    runs = ctx.runs(condition)
    return ctx.artifact(runs[0]["run_id"], PRECISION_FILE) if runs else None


def precision_section(ctx: ReportContext) -> list[str]:
    """Table 3 (Pi around the reliability shift) beside the paper, and the Pi and loss trajectories."""
    lines = ["## Pi around the reliability shift (Table 3)", "",
             "Pi after each step's update, condition shift.precision (first seed), beside the paper's values.", "",
             "| step | Pi_0 | Pi_1 | Pi_2 | Pi_3 | paper Pi_0..3 |", "|---|---|---|---|---|---|"]
    shift = _trajectory(ctx, "shift.precision")
    pi_NE = (shift or {}).get("precision", [])
    for step, paper in ctx.paper_table("pi_trajectory").items():
        if step < len(pi_NE):
            ours = " | ".join(f"{v:.2f}" for v in pi_NE[step])
            lines.append(f"| {step} | {ours} | {', '.join(f'{v:.2f}' for v in paper)} |")
    fig = figure(9, 3.2)
    drawn = False
    for i, condition in enumerate(("static.precision", "shift.precision")):
        data = _trajectory(ctx, condition)
        if not data or "precision" not in data:
            continue
        ax = fig.add_subplot(1, 3, i + 1)
        for e, column in enumerate(zip(*data["precision"])):
            ax.plot(column, lw=1, label=f"Pi_{e}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(condition, fontsize=9)
        ax.legend(fontsize=7)
        drawn = True
    ax = fig.add_subplot(1, 3, 3)
    for condition in ("shift.affinity", "shift.precision"):
        data = _trajectory(ctx, condition)
        if data:
            window = 20  # a 20-step running mean: single-batch losses are noisy
            loss = data["loss"]
            smooth = [statistics.fmean(loss[max(0, i - window + 1) : i + 1]) for i in range(len(loss))]
            ax.plot(smooth, lw=1, label=condition)
            drawn = True
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("training MSE (20-step mean)", fontsize=9)
    ax.legend(fontsize=7)
    lines.append("")
    if drawn:
        fig.tight_layout()
        path = ctx.plot("transitions_precision_trajectory.png")
        fig.savefig(path, dpi=110)
        lines += [ctx.link(path, "Pi and loss trajectories"), ""]
    return lines


def render(ctx: ReportContext) -> list[str]:
    """The study's extra sections: paired gains (toy), aligned p(correct expert) plots and wall time."""
    conditions = ctx.results.conditions()
    if "shift.precision" in conditions:
        return precision_section(ctx) + time_section(ctx)
    if "standard" in conditions:
        fixed = [c for c in conditions if not c.startswith("random.")]
        groups = {"fixed switch at 32": fixed, "random switch 16..48": [c for c in conditions if c not in fixed]}
        lines = curve_section(ctx, groups, ["p_correct", "bpc"]) + specialisation_section(ctx)
    else:
        lines = ["## Paired gains and interaction", ""] + paired_section(ctx)
        if "random.baseline" in conditions:
            lines += paired_section(ctx, "random.")
        shown = ["baseline", "beta", "ant", "beta+ant", "oracle"]
        groups = {"fixed switch at 6": [c for c in shown if c in conditions],
                  "random switch 3..9": [f"random.{c}" for c in shown if f"random.{c}" in conditions]}
        lines += curve_section(ctx, groups, ["p_correct"])
    return lines + time_section(ctx)
