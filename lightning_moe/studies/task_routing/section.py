"""Report sections of the task-routing studies (``recipes/task_routing``, its ``grid/`` and ``capacity/``), built from
the ``routing.json`` each run writes (:meth:`TaskRoutingLM.artifact`, written by its ``RunArtifact``).

Legend: K tasks, E experts, W widths swept.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_moe.studies.artifacts import ROUTING_FILE
from lightning_moe.studies.task_routing.data import TemplateKVTasks
from lightning_moe.studies.report import ReportContext, figure, markdown_table, mean_std, mean_std_text

EM_TARGET = 0.95  # w*(k): the smallest width whose train exact match of task k reaches this (the spec's threshold)


def _heatmap(ax, R_KE: list[list[float]], title: str):
    im = ax.imshow(R_KE, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    K, E = len(R_KE), len(R_KE[0])
    ax.set_xticks(range(E))
    ax.set_yticks(range(0, K, max(1, K // 10)))
    ax.set_xlabel("expert")
    ax.set_ylabel("task")
    ax.set_title(title, fontsize=9)
    if K * E <= 200:  # numbers are readable only on small matrices (20 x 7 is the paper's Fig. 2)
        for k in range(K):
            for e in range(E):
                ax.text(e, k, f"{R_KE[k][e]:.2f}"[1:] if R_KE[k][e] < 1 else "1", ha="center", va="center",
                        fontsize=5, color="w" if R_KE[k][e] < 0.5 else "k")
    return im


def _ceiling(ctx: ReportContext, condition: str, cache: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """(train, test) :meth:`TemplateKVTasks.exact_match_ceiling` of the data the condition trained on, rebuilt from
    its resolved config."""
    import yaml

    args = yaml.safe_load(ctx.paths.config(condition).read_text())["data"]["init_args"]["tasks"]["init_args"]
    key = repr(sorted(args.items()))
    if key not in cache:
        tasks = TemplateKVTasks(**args)
        cache[key] = (tasks.exact_match_ceiling("train"), tasks.exact_match_ceiling("test"))
    return cache[key]


def _exact_match_gap(ctx: ReportContext) -> list[str]:
    """Training vs test exact match per condition, beside what the best possible model reaches on the same data:
    how much of the gap to the paper is the data, and how much is generalisation."""
    rows, cache = [], {}
    for condition in ctx.results.conditions():
        train, test = (mean_std(list(ctx.results.values(condition, m).values()))
                       for m in ("val/train_exact_match", "val/exact_match"))
        if train[0] is None or test[0] is None:
            continue
        best_train, best_test = _ceiling(ctx, condition, cache)
        steps = ctx.runs(condition)[0].get("global_step", "")
        rows.append([condition, steps, mean_std_text(*train), f"{best_train:.3f}", mean_std_text(*test),
                     f"{best_test:.3f}", f"{train[0] - test[0]:+.3f}"])
    if not rows:
        return []
    return ["## Exact match: training sentences vs held-out ones, and the data's ceiling", "",
            "Greedy exact match on the training split beside the test split (answerable sentences: their (task, "
            "subject) fact is in a training sentence, under another template), each beside the ceiling of the "
            "data: the exact match of the best possible model, which cannot tell two tasks apart where their "
            "templates share the words before the object and both dictionaries hold the subject "
            "(`TemplateKVTasks.exact_match_ceiling`). A large train - test gap means the model has stored the facts "
            "with the templates it saw them in: the held-out number measures transfer of a fact to a new "
            "template.", ""] + \
        markdown_table(["condition", "steps", "train exact match", "train ceiling", "test exact match",
                        "test ceiling", "train - test"], rows) + [""]


def render(ctx: ReportContext) -> list[str]:
    """Per condition, the task x expert routing matrices (top-1 share and mean router probability) of its first
    finished seed as heatmaps; seeds are not averaged because without the task-routing loss the experts' order is
    arbitrary per seed."""
    legend = ("R[k, e] = share of task k's test-token positions whose top-1 expert is e (left) and mean router "
              "probability of e over those positions (right, the paper's heatmap), first finished seed of each "
              "condition, at the end of training. Rows sum to 1; a one-task-one-expert router has a single bright "
              "cell per row.")
    lines = _exact_match_gap(ctx) + ["## Routing matrices", "", legend, ""]
    drawn = 0
    for condition in ctx.results.conditions():
        runs = ctx.runs(condition)
        art = next((a for r in runs if (a := ctx.artifact(r["run_id"], ROUTING_FILE)) is not None), None)
        if art is None:
            continue
        metrics = runs[0]["metrics"]
        K = art["num_tasks"]
        fig = figure(9.0, 1.6 + 0.16 * K)
        axes = fig.subplots(1, 2)
        tp, nmi = metrics.get("val/route/task_purity"), metrics.get("val/route/nmi")
        _heatmap(axes[0], art["routing_hard"], f"{condition}, top-1 share (TP {tp:.2f}, NMI {nmi:.2f})")
        im = _heatmap(axes[1], art["routing_soft"], f"{condition}, mean router probability")
        fig.colorbar(im, ax=list(axes), fraction=0.025)
        path = ctx.plot(f"routing_{condition}.png")
        fig.savefig(path, dpi=110)
        E = art["num_experts"]
        # The best NMI a deterministic task -> expert map can reach (tasks of about equal size, so H(task) ~ log K):
        # I = H(E) = log min(K, E), so 2I / (H(task) + H(E)) = 2 log min(K, E) / (log K + log min(K, E)).
        best = 2 * math.log(min(K, E)) / (math.log(K) + math.log(min(K, E))) if min(K, E) > 1 else 0.0
        head = (f"**{condition}** (seed {runs[0]['seed']}, step {art['step']}; K={K}, E={E}: the NMI of a "
                f"one-expert-per-task map is at most about {best:.3f})")
        lines += [head, "",
                  ctx.link(path, f"routing matrix {condition}"), ""]
        drawn += 1
    if not drawn:
        lines += ["(no finished run left a routing matrix)", ""]
    return lines


def _capacity_rows(ctx: ReportContext) -> list[dict[str, Any]]:
    """One row per (run, task): K, width, N, c(k), bound, train exact match of the task."""
    import yaml

    rows = []
    for condition in ctx.results.conditions():
        config = yaml.safe_load(ctx.paths.config(condition).read_text())
        n_pairs = config["data"]["init_args"]["tasks"]["init_args"]["pairs_per_task"]
        for run in ctx.runs(condition):
            art = ctx.artifact(run["run_id"], ROUTING_FILE)
            if art is None or art.get("train_exact_match_per_task") is None:
                continue
            for k, em in enumerate(art["train_exact_match_per_task"]):
                rows.append({"K": art["num_tasks"], "w": art["d_ff"], "N": n_pairs, "task": k, "em": em,
                             "c": art["complexity_per_task"][k], "bound": art["width_bound_per_task"][k]})
    return rows


def _w_star(rows: list[dict[str, Any]]) -> dict[tuple[int, int, int], int | None]:
    """(K, N, task) -> the smallest width reaching EM_TARGET, None when no width does."""
    out: dict[tuple[int, int, int], int | None] = {}
    for r in sorted(rows, key=lambda r: r["w"]):
        key = (r["K"], r["N"], r["task"])
        out.setdefault(key, None)
        if out[key] is None and r["em"] >= EM_TARGET:
            out[key] = r["w"]
    return out


def render_capacity(ctx: ReportContext) -> list[str]:
    """The capacity sweep: train exact match against expert width per dictionary size, w*(k) against the task's
    complexity and the theorem's bound, and the same tasks among K=5 and K=10."""
    rows = _capacity_rows(ctx)
    if not rows:
        return ["## Capacity", "", "(no finished run left per-task accuracies)", ""]
    w_star = _w_star(rows)
    widths = sorted({r["w"] for r in rows})
    info = {(r["K"], r["N"], r["task"]): r for r in rows}
    legend = (f"w*(k) = the smallest swept width (of {widths}) whose greedy exact match on task k's training "
              f"sentences is >= {EM_TARGET}; `>{widths[-1]}` when none is. c(k) = sum of template lengths + N; "
              "bound = L*|T(k)| + N (Thm 4.2, L = the task's longest template).")
    lines = ["## Capacity: w*(k) against complexity", "", legend, "",
             "| K | N | task | c(k) | bound | " + " | ".join(f"EM w={w}" for w in widths) + " | w*(k) |",
             "|---|---|---|---|---|" + "---|" * len(widths) + "---|"]
    em = {(r["K"], r["N"], r["task"], r["w"]): r["em"] for r in rows}
    for key in sorted(w_star):
        K, N, k = key
        cells = [f"{em[(K, N, k, w)]:.3f}" if (K, N, k, w) in em else "—" for w in widths]
        ws = w_star[key]
        lines.append(f"| {K} | {N} | {k} | {info[key]['c']} | {info[key]['bound']} | " + " | ".join(cells)
                     + f" | {ws if ws is not None else '>' + str(widths[-1])} |")
    lines.append("")
    lines += _monotonicity(w_star, info, widths)
    lines += _independence(w_star, em, widths)
    lines += _capacity_plot(ctx, rows, w_star, widths)
    return lines


def _monotonicity(w_star, info, widths) -> list[str]:
    """Count pairs of K=5 tasks ordered by complexity whose w* go the other way (ties in c are skipped)."""
    big = 2 * widths[-1]  # "> largest width" sorts above every swept width
    K = min(k[0] for k in w_star)
    tasks = sorted((info[k]["c"], big if w is None else w) for k, w in w_star.items() if k[0] == K)
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:] if a[0] < b[0]]
    against = sum(1 for a, b in pairs if a[1] > b[1])
    within = sum(1 for k, w in w_star.items() if w is not None and w <= info[k]["bound"])
    over = sum(1 for k, w in w_star.items() if w is not None and w > info[k]["bound"])
    text = (f"Monotonicity (K={K}): of {len(pairs)} task pairs with different c(k), {against} have w* decreasing "
            f"as c grows ({len(pairs) - against} agree or tie). Of {len(w_star)} (K, N, task) cells, w* is at or under "
            f"the bound in {within}, above it in {over}, and no swept width reached {EM_TARGET} in "
            f"{len(w_star) - within - over}.")
    return [text, ""]


def _independence(w_star, em, widths) -> list[str]:
    """The same task (same templates and dictionary) among K=5 and among K=10 tasks."""
    Ks = sorted({k[0] for k in w_star})
    if len(Ks) < 2:
        return []
    small, large = Ks[0], Ks[-1]
    shared = sorted({(N, t) for K, N, t in w_star if K == large} & {(N, t) for K, N, t in w_star if K == small})
    if not shared:
        return []
    header = ("| N | task | " + " | ".join(f"EM w={w} (K={small} / K={large})" for w in widths)
              + f" | w* K={small} | w* K={large} | moved > one grid step |")
    lines = [f"## Capacity: the same task among K={small} and K={large} tasks", "", header,
             "|---|---|" + "---|" * (len(widths) + 3)]
    moved = 0
    for N, t in shared:
        cells = []
        for w in widths:
            a, b = em.get((small, N, t, w)), em.get((large, N, t, w))
            cells.append(f"{a:.3f} / {b:.3f}" if a is not None and b is not None else "—")
        ws = [w_star[(small, N, t)], w_star[(large, N, t)]]
        idx = [widths.index(w) if w is not None else len(widths) for w in ws]
        far = abs(idx[0] - idx[1]) > 1
        moved += far
        lines.append(f"| {N} | {t} | " + " | ".join(cells) + " | "
                     + " | ".join(str(w) if w is not None else f">{widths[-1]}" for w in ws) + f" | {'yes' if far else 'no'} |")
    lines += ["", f"w* moved by more than one grid step for {moved} of {len(shared)} shared tasks.", ""]
    return lines


def _capacity_plot(ctx: ReportContext, rows, w_star, widths) -> list[str]:
    fig = figure(9.0, 3.4)
    left, right = fig.subplots(1, 2)
    for (K, N) in sorted({(r["K"], r["N"]) for r in rows}):
        pts = sorted((r["w"], r["em"]) for r in rows if r["K"] == K and r["N"] == N)
        by_w = {w: [e for ww, e in pts if ww == w] for w in widths}
        xs = [w for w in widths if by_w[w]]
        left.plot(xs, [sum(by_w[w]) / len(by_w[w]) for w in xs], marker="o", linestyle="-" if K == 5 else "--",
                  label=f"K={K}, N={N}")
    left.axhline(EM_TARGET, color="0.6", lw=0.8)
    left.set_xscale("log", base=2)
    left.set_xlabel("expert width w")
    left.set_ylabel("train exact match (mean over tasks)")
    left.legend(fontsize=7)
    info = {(r["K"], r["N"], r["task"]): r for r in rows}
    big = 2 * widths[-1]
    pts = [(info[k]["c"], big if w is None else w, info[k]["bound"]) for k, w in w_star.items()]
    right.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, label="w*(k) (top row: none reached)")
    right.scatter([p[0] for p in pts], [p[2] for p in pts], s=10, marker="x", color="tab:red",
                  label="bound L|T|+N")
    right.set_yscale("log", base=2)
    right.set_xlabel("task complexity c(k)")
    right.set_ylabel("width")
    right.legend(fontsize=7)
    fig.tight_layout()
    path = ctx.plot("capacity.png")
    fig.savefig(path, dpi=110)
    return [ctx.link(path, "capacity sweep"), ""]
