"""Report sections of the geometric-coupling study (``recipes/geometric_coupling``; arXiv 2605.12476).

Per-layer tables beside the paper's per-layer numbers, curves over training and decile curves, built from the
final logged values in the rows file and each run's ``coupling.json``
(:class:`~lightning_moe.callbacks.CouplingMonitor`). Layers are shown as ``L0, L1, ...`` in model order.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

from lightning_moe.callbacks import COUPLING_HEADLINE, coupling_metric_name, matplotlib_available
from lightning_moe.metrics import COUPLING_RESPONSES, COUPLING_SCORES
from lightning_moe.studies.report import ReportContext, figure, markdown_table, mean_std, mean_std_text

ARTIFACT = "coupling.json"
_DASH = "—"


def _text(values: Sequence[float]) -> str:
    """Mean ± std over seeds, or a dash."""
    return mean_std_text(*mean_std([v for v in values if v is not None and not math.isnan(v)]))


def _final(ctx: ReportContext, condition: str, key: str) -> list[float]:
    """The final logged value of ``key`` in each finished run of ``condition``."""
    return [r["metrics"][key] for r in ctx.runs(condition) if key in r["metrics"]]


def _per_layer_table(ctx: ReportContext, layers: list[str], key: Callable[[str], str], mean_key: str | None,
                     paper: Callable[[str], str] | None = None, mean_label: str = "mean over layers") -> list[str]:
    """Conditions x layers (mean ± std over seeds) of ``key(layer)``, plus the all-layer value ``mean_key``
    (headed ``mean_label``) and a paper column."""
    header = ["condition"] + [f"L{i}" for i in range(len(layers))] + ([mean_label] if mean_key else [])
    header += ["paper"] if paper else []
    rows = []
    for c in ctx.results.conditions():
        row = [c] + [_text(_final(ctx, c, key(layer))) for layer in layers]
        row += [_text(_final(ctx, c, mean_key))] if mean_key else []
        row += [paper(c)] if paper else []
        rows.append(row)
    return markdown_table(header, rows)


def _history(ctx: ReportContext, condition: str, key: str) -> tuple[list[int], list[float]]:
    """Steps and the mean over seeds of ``key`` at each validation of ``condition`` (steps every seed has)."""
    per_seed = []
    for r in ctx.runs(condition):
        art = ctx.artifact(r["run_id"], ARTIFACT)
        if art:
            per_seed.append({h["step"]: h["metrics"][key] for h in art["history"] if key in h["metrics"]})
    if not per_seed:
        return [], []
    steps = sorted(set.intersection(*(set(s) for s in per_seed)))
    return steps, [statistics.fmean(s[t] for s in per_seed) for t in steps]


def _figure(panels: int, width: float = 5.0, height: float = 3.4):
    """A row of ``panels`` axes (matplotlib's object API: no pyplot state)."""
    fig = figure(width * panels, height)
    fig.set_layout_engine("constrained")
    return fig, fig.subplots(1, panels, squeeze=False)[0].tolist()


def _curves_plot(ctx: ReportContext, keys: list[tuple[str, str]], name: str, log: bool) -> str | None:
    """One panel per ``(key, title)``: the mean over seeds of ``key`` at each validation, one line per condition."""
    fig, axes = _figure(len(keys))
    drawn = False
    for ax, (key, title) in zip(axes, keys):
        for c in ctx.results.conditions():
            steps, values = _history(ctx, c, key)
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, label=c)
                drawn = True
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
    if not drawn:
        return None
    axes[0].legend(fontsize=7)
    path = ctx.plot(name)
    fig.savefig(path, dpi=100)
    return ctx.link(path, name)


def _balance(ctx: ReportContext, layers: list[str], plots: bool) -> list[str]:
    out = ["## Load balance per layer", "",
           "Final values, mean ± std over seeds. MaxVio_batch: MaxVio of each training batch averaged over the last "
           "100 steps; MaxVio_global: over the validation set. The paper reports only the layer mean "
           "(Table 1, step 21k; MaxVio_batch assumed).", ""]
    paper = {c.name: ctx.study.paper_value(c.name, "val/train_maxvio_batch") for c in ctx.study.conditions}
    out += ["**MaxVio_batch**", ""]
    out += _per_layer_table(ctx, layers, lambda l: f"val/train_maxvio_batch/{l}", "val/train_maxvio_batch",
                            lambda c: f"{paper[c].mean:g}" if paper.get(c) else _DASH)
    out += ["", "**MaxVio_global**", ""]
    out += _per_layer_table(ctx, layers, lambda l: f"val/load/{l}/maxvio_global", "val/maxvio_global")
    out += ["", "**Load CV (validation set)**", ""]
    out += _per_layer_table(ctx, layers, lambda l: f"val/load/{l}/cv", "val/cv")
    out.append("")
    if plots:
        link = _curves_plot(ctx, [("val/train_maxvio_batch", "MaxVio_batch (mean over layers, log)"),
                                  ("val/maxvio_global", "MaxVio_global (mean over layers, log)")],
                            "maxvio_over_training.png", log=True)
        if link:
            out += ["MaxVio over training (mean over seeds; the paper's Fig. 4 shows the aux-loss run collapsing, "
                    "then recovering):", "", link, ""]
    return out


def _perplexity(ctx: ReportContext) -> list[str]:
    out = ["## Perplexity", "",
           "Validation perplexity exp(loss) per byte; the relative difference to Loss-Free uses the mean losses "
           "(exp of their difference). The paper's perplexities are per token of a 50k vocabulary (train and "
           "C4-en, step 21k): only the relative differences compare.", ""]
    base = mean_std(_final(ctx, "loss_free", "val/loss"))[0]
    ppl = ctx.paper_table("perplexity")
    rows = []
    for c in ctx.results.conditions():
        losses = _final(ctx, c, "val/loss")
        mean = mean_std(losses)[0]
        delta = f"{math.expm1(mean - base):+.2%}" if mean is not None and base is not None else _DASH
        paper = _DASH
        if c in ppl:
            train, c4, ref = ppl[c]["train"], ppl[c]["c4"], ppl["loss_free"]
            paper = f"{train} / {c4} ({train / ref['train'] - 1:+.1%} / {c4 / ref['c4'] - 1:+.1%})"
        rows.append([c, _text([math.exp(v) for v in losses]), delta, paper])
    return out + markdown_table(["condition", "PPL (ours)", "vs loss_free", "paper train / C4 PPL (vs loss_free)"], rows) + [""]


def _geometry(ctx: ReportContext, layers: list[str], plots: bool) -> list[str]:
    out = ["## Router-row geometry per layer", "",
           "Signed mean off-diagonal cosine of the router rows (K-Means: of its centroids), final, mean ± std over "
           "seeds. The paper gives layers 0 / 4 / 8 of 9; ours has 4 layers, so only the direction compares.", ""]
    cosine = ctx.paper_table("cosine")
    out += _per_layer_table(
        ctx, layers, lambda l: f"val/geometry/{l}/mean_cosine", "val/geometry/mean_cosine",
        lambda c: " / ".join(f"{k}: {v}" for k, v in cosine[c].items()) if c in cosine else _DASH,
    )
    ratios = []
    for i, layer in enumerate(layers):
        aux = mean_std(_final(ctx, "aux_loss", f"val/geometry/{layer}/mean_cosine"))[0]
        free = mean_std(_final(ctx, "loss_free", f"val/geometry/{layer}/mean_cosine"))[0]
        ratios.append(f"L{i} {aux / free:.2f}" if aux is not None and free else f"L{i} {_DASH}")
    paper_ratios = ", ".join(f"{k} {cosine['aux_loss'][k] / v:.1f}" for k, v in cosine["loss_free"].items())
    out += ["", f"Aux-Loss / Loss-Free cosine ratio per layer: {', '.join(ratios)} (paper: {paper_ratios}).", ""]
    out += ["**Nearest-neighbour cosine / effective rank of the rows (mean over layers)**", ""]
    rows = []
    for c in ctx.results.conditions():
        nn = [statistics.fmean(v) for v in zip(*(_final(ctx, c, f"val/geometry/{l}/nn_cosine") for l in layers))]
        rank = [statistics.fmean(v) for v in zip(*(_final(ctx, c, f"val/geometry/{l}/effective_rank") for l in layers))]
        rows.append([c, _text(nn), _text(rank)])
    out += markdown_table(["condition", "nearest-neighbour cosine", "effective rank (of 16)"], rows) + [""]
    if plots:
        link = _cosine_bars(ctx, layers, cosine)
        if link:
            out += [link, ""]
    return out


def _cosine_bars(ctx: ReportContext, layers: list[str], paper: dict[str, dict[str, float]]) -> str | None:
    """Grouped bars: mean router-row cosine per layer, one bar per condition, seeds as dots."""
    fig, (ax,) = _figure(1, width=7.0)
    conditions = ctx.results.conditions()
    width = 0.8 / len(conditions)
    for j, c in enumerate(conditions):
        for i, layer in enumerate(layers):
            vals = _final(ctx, c, f"val/geometry/{layer}/mean_cosine")
            if vals:
                x = i + (j - (len(conditions) - 1) / 2) * width
                ax.bar(x, statistics.fmean(vals), width, color=f"C{j}", label=c if i == 0 else None)
                ax.scatter([x] * len(vals), vals, s=6, color="black", zorder=3)
    ax.set_xticks(range(len(layers)), [f"L{i}" for i in range(len(layers))])
    ax.set_ylabel("mean pairwise router-row cosine")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=7)
    ranges = ", ".join(f"{c} {min(v.values())}-{max(v.values())}" for c, v in paper.items())
    ax.set_title(f"router-row similarity per layer (paper: {ranges})", fontsize=9)
    path = ctx.plot("router_cosine_per_layer.png")
    fig.savefig(path, dpi=100)
    return ctx.link(path, "router-row cosine per layer")


def _coupling(ctx: ReportContext, layers: list[str], plots: bool) -> list[str]:
    paper = ctx.paper_table("coupling")
    out = ["## Score–activation coupling", "",
           "Spearman ρ of the selected expert's score against its response, z-scored per (layer, expert), pooled "
           "over layers, on the final validation set; mean ± std over seeds, and the largest (least significant) "
           f"log10 p of the seeds. Paper (Loss-Free run, weight vs gate norm): ρ = {paper['rho']}, p = {paper['p']}. "
           f"Headline: `{COUPLING_HEADLINE}` (the authors' script); `gate_act` is the digest's mean SiLU activation; "
           "`up_norm` is the linear branch the gradient argument is about; `logit` is the raw h·r_e. The t-test "
           "treats the pairs as independent; they are not (one token gives K pairs in every layer, tokens of a "
           "sequence share context), so p overstates the significance, as the paper's own p does.", ""]
    header = ["condition"] + [f"{coupling_metric_name(s, r)}: ρ (max log10 p)" for s in COUPLING_SCORES for r in COUPLING_RESPONSES]
    rows = []
    for c in ctx.results.conditions():
        row = [c]
        for s in COUPLING_SCORES:
            for r in COUPLING_RESPONSES:
                rho = _final(ctx, c, f"val/coupling/{coupling_metric_name(s, r)}/rho")
                p = _final(ctx, c, f"val/coupling/{coupling_metric_name(s, r)}/log10_p")
                row.append(f"{_text(rho)} ({max(p):.1f})" if p else _DASH)
        rows.append(row)
    out += markdown_table(header, rows) + ["", f"**Per layer, `{COUPLING_HEADLINE}` ρ** (paper: per-layer values not in the digest)", ""]
    out += _per_layer_table(ctx, layers, lambda l: f"val/coupling/{l}/{COUPLING_HEADLINE}/rho",
                            f"val/coupling/{COUPLING_HEADLINE}/rho", mean_label="pooled")
    out += ["", f"**Median ρ over (layer, expert) groups with enough pairs (the monitor's `min_group_pairs`, 128 as the "
            f"authors), `{COUPLING_HEADLINE}` / `weight_vs_up_norm`**", ""]
    out += markdown_table(["condition", COUPLING_HEADLINE, "weight_vs_up_norm"], [
        [c, _text(_final(ctx, c, f"val/coupling/{COUPLING_HEADLINE}/median_group_rho")),
         _text(_final(ctx, c, "val/coupling/weight_vs_up_norm/median_group_rho"))]
        for c in ctx.results.conditions()
    ]) + [""]
    neg = _final(ctx, "kmeans", "val/coupling/negative_weight_fraction")
    if neg:
        out += [f"K-Means with identity mixing: share of selected slots with a negative (cosine) weight on the "
                f"final validation set = {_text(neg)}.", ""]
    if plots:
        link = _decile_plot(ctx)
        if link:
            out += ["Decile curves (mean over seeds; rising = coupled; the paper's Fig. 2 is monotone):", "", link, ""]
        link = _curves_plot(ctx, [(f"val/coupling/{COUPLING_HEADLINE}/rho", f"{COUPLING_HEADLINE} rho"),
                                  ("val/coupling/weight_vs_up_norm/rho", "weight_vs_up_norm rho")],
                            "coupling_over_training.png", log=False)
        if link:
            out += ["Coupling over training (mean over seeds):", "", link, ""]
    return out


def _decile_plot(ctx: ReportContext) -> str | None:
    """Mean z-scored response per dispatch-weight decile, one panel per response, one line per condition."""
    fig, axes = _figure(len(COUPLING_RESPONSES))
    drawn = False
    for ax, r in zip(axes, COUPLING_RESPONSES):
        for c in ctx.results.conditions():
            curves = [art["coupling"][coupling_metric_name("weight", r)]["pooled"]["deciles"]
                      for row in ctx.runs(c) if (art := ctx.artifact(row["run_id"], ARTIFACT)) and art.get("coupling")]
            if curves:
                ax.plot(range(1, 11), [statistics.fmean(v) for v in zip(*curves)], marker="o", markersize=3, label=c)
                drawn = True
        ax.axhline(0, color="grey", linestyle=":")
        ax.set_xlabel("dispatch-weight decile")
        ax.set_ylabel("mean per-expert z-score")
        ax.set_title(f"weight vs {r}", fontsize=9)
    if not drawn:
        return None
    axes[0].legend(fontsize=7)
    path = ctx.plot("coupling_deciles.png")
    fig.savefig(path, dpi=100)
    return ctx.link(path, "coupling decile curves")


def _accumulated_history(ctx: ReportContext, layers: list[str]) -> list[str]:
    out = ["## Accumulated history", "",
           "The paper's mechanism (Sec. 3): a router row and its expert's W_up rows get gradients along the same "
           "routed tokens, so both should have grown along the tokens their expert received. History: cos(r_i - "
           "r_i(0), mu_i), a router row's change since step 0 against the mean validation hidden state routed to "
           "its own expert (matched) and to the other experts (mismatched, the baseline: hidden states may share "
           "a direction); match rate: share of rows whose best-aligned mu is their own expert's "
           "(chance 1/16 = 0.0625). W_up direction: |cos(r_i, v_i)|, v_i the top right-singular vector of expert "
           "i's W_up. Final validation, mean over layers, mean ± std over seeds. The frozen random router never "
           "moves, so it has no history. The paper gives no number for either check. A cosine below 0 means "
           "the row moved away from those tokens; where both cosines are negative, every row moved away from the "
           "direction all hidden states share, and the check is the difference and the match rate.", ""]
    keys = [("history", "matched"), ("history", "mismatched"), ("history", "match_rate"),
            ("up_direction", "matched"), ("up_direction", "mismatched"), ("up_direction", "match_rate")]
    header = ["condition"] + [f"{'history' if c == 'history' else 'W_up direction'} {k.replace('_', ' ')}"
                              for c, k in keys]
    rows = [[c] + [_text(_final(ctx, c, f"val/coupling/{check}/{k}")) for check, k in keys]
            for c in ctx.results.conditions()]
    out += markdown_table(header, rows) + ["", "**History matched - mismatched per layer**", ""]
    rows = []
    for c in ctx.results.conditions():
        gaps = [[m - o for m, o in zip(_final(ctx, c, f"val/coupling/{l}/history/matched"),
                                       _final(ctx, c, f"val/coupling/{l}/history/mismatched"))] for l in layers]
        rows.append([c] + [_text(g) for g in gaps])
    return out + markdown_table(["condition"] + [f"L{i}" for i in range(len(layers))], rows) + [""]


def _specialization(ctx: ReportContext, layers: list[str]) -> list[str]:
    out = ["## Domain specialisation", "",
           "NMI(domain; expert) over all K slots (arithmetic normalisation), code vs prose, final validation set. "
           "The paper argues, without measuring it, that the aux loss reduces specialisation.", ""]
    per_layer = lambda l: f"val/spec/{l}/nmi"
    out += _per_layer_table(ctx, layers, per_layer, None)
    return out + [""]


def render(ctx: ReportContext) -> list[str]:
    """Markdown sections built from the rows and each run's ``coupling.json``."""
    arts = [a for c in ctx.results.conditions() for r in ctx.runs(c) if (a := ctx.artifact(r["run_id"], ARTIFACT))]
    if not arts:
        return ["## Study sections", "", f"No run wrote `{ARTIFACT}`: is the CouplingMonitor in the config?", ""]
    layers = arts[0]["layers"]
    plots = matplotlib_available()
    out = _perplexity(ctx) + _balance(ctx, layers, plots) + _geometry(ctx, layers, plots)
    out += _coupling(ctx, layers, plots) + _accumulated_history(ctx, layers) + _specialization(ctx, layers)
    if plots:
        link = _curves_plot(ctx, [("val/loss", "validation loss (nats/byte)")], "val_loss_over_training.png", False)
        if link:
            out += ["## Validation loss over training", "", link, ""]
    return out
