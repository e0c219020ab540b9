"""Report sections of the sparsity study (``recipes/sparsity``, spec "MoE design by total parameters and expert
sparsity"): every shape counted with :func:`lightning_moe.params.count` from its run's resolved config, loss against
s = n_exp / n_topk and against n_exp per family, the least-squares law ``loss = E0 + B log s (+ C log n_exp)`` per
family, and the spec's claims (ii) and (iii), which need a spread or a minimum rather than one comparison.

Condition names carry their families: ``f1+2_E32k8`` is a shape of Family 1 and Family 2 (see
``recipes/sparsity/make_study.py``). Losses are per run (one point per seed) in the fits and mean over seeds in the
tables.

Legend: R runs (points of a fit), P fitted coefficients.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

from lightning_moe.params import MoEShape, count
from lightning_moe.studies.report import ReportContext, figure, markdown_table, mean_std, mean_std_text

LOSS = "val/loss"
SPREAD_MAX = 0.25  # claim (ii): spread over n_exp at fixed s below this fraction of the gap between adjacent s
_NAME = re.compile(r"^f(?P<families>\d(?:\+\d)*)_E\d+k\d+$")
FAMILY_TEXT = {
    1: "Family 1: iso-N_total, fixed core (L=3, d=96, n_exp x d_e = 1536)",
    2: "Family 2: iso-N_total, expert width tied to the width (d_e = d/2, L=3)",
    3: "Family 3: iso-N_total and iso-N_active",
}


def families(condition: str) -> tuple[int, ...]:
    """The families a condition belongs to, from its name (``f1+2_E32k8`` -> (1, 2))."""
    m = _NAME.match(condition)
    if m is None:
        raise ValueError(
            f"condition {condition!r} is not named f<families>_E<n_exp>k<n_topk> (e.g. f1+2_E32k8); write the "
            "conditions with recipes/sparsity/make_study.py."
        )
    return tuple(int(f) for f in m["families"].split("+"))


def shape_of(config: dict[str, Any]) -> MoEShape:
    """The :class:`MoEShape` of a resolved ``lightning-moe fit`` config of :class:`MoELanguageModel`."""
    m = config["model"]["init_args"]
    # The calculator's shared experts have width d_expert and its dense layers lead; the study uses neither, so a
    # config with them would be miscounted rather than approximated.
    if m.get("shared_d_ff", 0) or m.get("moe_every", 1) != 1:
        raise ValueError(
            f"shared_d_ff={m.get('shared_d_ff')} / moe_every={m.get('moe_every')}: the sparsity study counts "
            "all-MoE models without shared experts; set shared_d_ff: 0 and moe_every: 1."
        )
    return MoEShape(
        d_model=m["d_model"], n_layers=m["n_layers"], num_experts=m["num_experts"], top_k=m["top_k"],
        d_expert=m["d_ff"], vocab_size=m["vocab_size"], n_heads=m["n_heads"], glu=m["activation"] == "swiglu",
        seq_len=config["data"]["init_args"]["seq_len"],
    )


@dataclass(frozen=True)
class Point:
    """One condition: its shape, counts and per-seed results."""

    condition: str
    families: tuple[int, ...]
    shape: MoEShape
    counts: dict[str, float]
    losses: list[float]
    tokens: int  # per run: max_steps x batch_size x seq_len
    fit_s: list[float]
    wall_s: list[float]

    @property
    def s(self) -> float:
        return self.shape.num_experts / self.shape.top_k

    @property
    def loss(self) -> float:
        return mean_std(self.losses)[0]


def points(ctx: ReportContext) -> list[Point]:
    """The conditions with at least one finished run."""
    import yaml

    out = []
    for condition in ctx.results.conditions():
        runs = [r for r in ctx.runs(condition) if LOSS in r["metrics"]]
        if not runs:
            continue
        config = yaml.safe_load(ctx.paths.config(condition).read_text())
        shape = shape_of(config)
        data = config["data"]["init_args"]
        tokens = config["trainer"]["max_steps"] * data["batch_size"] * data["seq_len"]
        out.append(Point(condition, families(condition), shape, count(shape), [r["metrics"][LOSS] for r in runs],
                         tokens, [r["fit_s"] for r in runs], [r["wall_s"] for r in runs]))
    return out


def fit(ps: list[Point], with_n_exp: bool) -> dict[str, float] | None:
    """Least squares of every run's loss on ``[1, log s (, log n_exp)]``: coefficients E0, B (, C), R^2 and the RMS
    residual; None when the design is rank-deficient (too few distinct s / n_exp)."""
    import torch

    rows, y = [], []
    for p in ps:
        for loss in p.losses:
            rows.append([1.0, math.log(p.s)] + ([math.log(p.shape.num_experts)] if with_n_exp else []))
            y.append(loss)
    X_RP = torch.tensor(rows, dtype=torch.float64)
    y_R = torch.tensor(y, dtype=torch.float64)
    if len(y) <= X_RP.shape[1] or torch.linalg.matrix_rank(X_RP) < X_RP.shape[1]:
        return None
    coef_P = torch.linalg.lstsq(X_RP, y_R[:, None]).solution[:, 0]
    resid_R = y_R - X_RP @ coef_P
    ss_tot = float(((y_R - y_R.mean()) ** 2).sum())
    out = dict(zip(("E0", "B", "C"), coef_P.tolist()))
    out["R2"] = 1.0 - float((resid_R**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    out["rms"] = float(resid_R.pow(2).mean().sqrt())
    return out


def _m(x: float) -> str:
    return f"{x / 1e6:.3f}M"


def _shape_table(ps: list[Point]) -> list[str]:
    header = ["condition", "family", "N_total", "N_active", "N_total (+emb)", "s", "n_exp", "n_topk", "L", "d",
              "d_e", "attention / active", "train FLOPs/token", "loss (nats/byte)", "tokens/s", "fit s", "wall s"]
    rows = []
    for p in ps:
        c, sh = p.counts, p.shape
        attn_share = sh.n_layers * c["attention_per_layer"] / c["active_nonemb"]
        rows.append([
            p.condition, "+".join(map(str, p.families)), _m(c["total_nonemb"]), _m(c["active_nonemb"]),
            _m(c["total"]), f"{p.s:g}", sh.num_experts, sh.top_k, sh.n_layers, sh.d_model, sh.d_expert,
            f"{100 * attn_share:.0f} %", f"{c['train_flops_per_token'] / 1e6:.2f}M",
            mean_std_text(*mean_std(p.losses)), f"{p.tokens / mean_std(p.fit_s)[0]:,.0f}",
            f"{mean_std(p.fit_s)[0]:.0f}", f"{mean_std(p.wall_s)[0]:.0f}",
        ])
    return markdown_table(header, rows)


def _grid_table(ps: list[Point]) -> list[str]:
    """Mean loss, rows n_exp, columns s."""
    ss = sorted({p.s for p in ps})
    by = {(p.shape.num_experts, p.s): p for p in ps}
    rows = []
    for e in sorted({p.shape.num_experts for p in ps}):
        cells = [f"{by[e, s].loss:.4f} (d={by[e, s].shape.d_model}, L={by[e, s].shape.n_layers})"
                 if (e, s) in by else "—" for s in ss]
        rows.append([e, *cells])
    return markdown_table(["n_exp \\ s", *(f"s={s:g}" for s in ss)], rows)


def _level_means(ps: list[Point]) -> dict[float, float]:
    """s -> mean over n_exp of the (seed-mean) losses at that s."""
    return {s: mean_std([p.loss for p in ps if p.s == s])[0] for s in sorted({p.s for p in ps})}


def spread_check(ps: list[Point]) -> list[tuple[float, float, float, bool]]:
    """Claim (ii) per s with >= 2 n_exp: (s, spread over n_exp, gap to the adjacent s levels, holds). The gap is the
    mean |difference| between this s's n_exp-averaged loss and that of its neighbours on the family's s grid."""
    level = _level_means(ps)
    ss = list(level)
    out = []
    for i, s in enumerate(ss):
        losses = [p.loss for p in ps if p.s == s]
        neighbours = [ss[j] for j in (i - 1, i + 1) if 0 <= j < len(ss)]
        if len(losses) < 2 or not neighbours:
            continue
        spread = max(losses) - min(losses)
        gap = mean_std([abs(level[s] - level[n]) for n in neighbours])[0]
        out.append((s, spread, gap, spread < SPREAD_MAX * gap))
    return out


def _fit_lines(ctx: ReportContext, ps: list[Point], family: int) -> list[str]:
    """The family's fitted laws, and its claims (i)-(iii) decided from them (into the claims table)."""
    lines = []
    for with_n_exp in (False, True):
        f = fit(ps, with_n_exp)
        law = "E0 + B·log s" + (" + C·log n_exp" if with_n_exp else "")
        if f is None:
            lines.append(f"- loss = {law}: not identifiable from these points")
            continue
        c_text = f", C = {f['C']:+.4f}" if with_n_exp else ""
        lines.append(f"- loss = {law}: E0 = {f['E0']:.4f}, B = {f['B']:+.4f}{c_text} (R² = {f['R2']:.3f}, RMS "
                     f"residual {f['rms']:.4f}, {sum(len(p.losses) for p in ps)} runs)")
    plain = fit(ps, False)
    if plain is not None:
        ctx.claim(f"(i) Family {family}: loss rises with s at fixed N_total (fitted B > 0)", plain["B"] > 0,
                  f"B = {plain['B']:+.4f} nats/byte per e-fold of s (fit below)")
    for s, spread, gap, ok in spread_check(ps):
        ctx.claim(f"(ii) Family {family}, s={s:g}: n_exp matters less than s (spread of the loss over n_exp < "
                  f"{SPREAD_MAX:g} x the gap to the adjacent s levels)", ok,
                  f"spread {spread:.4f} vs gap {gap:.4f} (ratio {spread / gap:.2f}; needed < {SPREAD_MAX:g})")
    if family == 2 and (f := fit(ps, True)) is not None:
        d_by_e = sorted({(p.shape.num_experts, p.shape.d_model) for p in ps})
        shrink = all(a[1] > b[1] for a, b in itertools.pairwise(d_by_e))
        ctx.claim("(ii) Family 2: more experts cost loss when d must shrink to pay for them (fitted C > 0)",
                  f["C"] > 0, f"C = {f['C']:+.4f}; d by n_exp: {', '.join(f'{e}: {d}' for e, d in d_by_e)}"
                  f"{'' if shrink else ' (d does not shrink monotonically)'}")
    if family == 3:
        best = min(ps, key=lambda p: p.loss)
        lowest = min(p.s for p in ps)
        ctx.claim(f"(iii) Family 3: the lowest feasible s ({lowest:g}) gives the lowest loss", best.s == lowest,
                  f"best: {best.condition}, s={best.s:g}, loss {best.loss:.4f}; mean loss per s: "
                  + ", ".join(f"s={s:g}: {v:.4f}" for s, v in _level_means(ps).items()))
    return lines


def _plot(ctx: ReportContext, by_family: dict[int, list[Point]], x: str, name: str) -> str:
    """One panel per family: mean loss ± std against s (lines per n_exp) or against n_exp (lines per s)."""
    fig = figure(4.0 * len(by_family), 3.4)
    axes = fig.subplots(1, len(by_family), squeeze=False)[0]
    for ax, (family, ps) in zip(axes, by_family.items()):
        line_key = (lambda p: p.shape.num_experts) if x == "s" else (lambda p: p.s)
        x_key = (lambda p: p.s) if x == "s" else (lambda p: p.shape.num_experts)
        for value in sorted({line_key(p) for p in ps}):
            line = sorted((p for p in ps if line_key(p) == value), key=x_key)
            # One colour per value (powers of two) in every panel, so n_exp=8 is the same line colour throughout.
            ax.errorbar([x_key(p) for p in line], [p.loss for p in line],
                        yerr=[mean_std(p.losses)[1] or 0.0 for p in line], marker="o", capsize=3,
                        color=f"C{round(math.log2(value)) % 10}", label=f"{'n_exp' if x == 's' else 's'}={value:g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("s = n_exp / n_topk" if x == "s" else "n_exp")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(f"Family {family}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = ctx.plot(name)
    fig.savefig(path, dpi=100)
    return ctx.link(path, name.removesuffix(".png").replace("_", " "))


def _balance_lines(ctx: ReportContext, ps: list[Point]) -> list[str]:
    """Worst balance metrics over the sparse shapes (s > 1; s = 1 routes every token to every expert)."""
    sparse = [p for p in ps if p.s > 1]
    if not sparse:
        return []

    def worst(metric: str) -> tuple[float, str]:
        vals = [(v, p.condition) for p in sparse for v in ctx.results.values(p.condition, metric).values()]
        return max(vals) if vals else (float("nan"), "—")

    intro = ("Worst single run over the shapes with s > 1, so routing collapse can be ruled in or out as the cause "
             "of a loss difference (per-condition means are in the results table above):")
    lines = ["## Balance", "", intro, ""]
    for metric in ("val/maxvio_global", "val/cv", "val/dead_experts"):
        v, where = worst(metric)
        lines.append(f"- {metric}: 0 in every run" if v == 0 else f"- {metric}: {v:.4g} ({where})")
    return lines + [""]


def render(ctx: ReportContext) -> list[str]:
    """Shape table, per-family loss grids, fits and claims (ii)/(iii), two plots and the balance summary."""
    ps = points(ctx)
    if not ps:
        return ["## Sparsity analysis", "", "(no finished run)", ""]
    intro = ("Counts from `lightning_moe.params.count` on each run's resolved config (N_total and N_active are "
             "non-embedding unless marked +emb; tied byte embeddings add 256·d). tokens/s = tokens per run / fit "
             "time, mean over seeds; fit and wall time in seconds per run (with other jobs sharing the CPU).")
    lines = ["## Shapes and cost", "", intro, ""]
    lines += _shape_table(ps) + [""]
    by_family = {f: [p for p in ps if f in p.families] for f in sorted({f for p in ps for f in p.families})}
    law_note = ("The spec's law adds A·N_total^(−α); N_total is fixed within a family, so that term is part of E0 "
                "here. The families differ in N_total (1.44–2.0M) but also in core shape, so no N_total exponent "
                "is fitted across them. Fits use every run (one point per seed).")
    lines += [law_note, ""]
    for family, fps in by_family.items():
        lines += [f"## {FAMILY_TEXT.get(family, f'Family {family}')}", "", "Mean validation loss over seeds:", ""]
        lines += _grid_table(fps) + [""] + _fit_lines(ctx, fps, family) + [""]
    seed_sd = [sd for p in ps if (sd := mean_std(p.losses)[1]) is not None]
    if seed_sd:
        noise = (f"Seed-to-seed standard deviation of the loss, mean over shapes: {mean_std(seed_sd)[0]:.4f} "
                 "nats/byte (differences below about twice this are noise at 2 seeds).")
        lines += [noise, ""]
    lines += ["## Loss against s and n_exp", "", _plot(ctx, by_family, "s", "loss_vs_s.png"), "",
              _plot(ctx, by_family, "n_exp", "loss_vs_n_exp.png"), ""]
    return lines + _balance_lines(ctx, ps)
