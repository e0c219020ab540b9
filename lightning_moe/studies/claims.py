"""Claims a study checks, written as data in ``study.yaml`` and evaluated against aggregated numbers.

A claim compares *references*: a reference is one ``(condition, metric)`` value (the mean over seeds) or a linear
combination of such values (``terms``), e.g. an interaction ``acc(b+a) - acc(b) - acc(a) + acc(base)``.
Kinds (every bound is inclusive, every comparison between references strict unless said otherwise):

==========  ===========================  =====================================================================
kind        fields                       holds when
==========  ===========================  =====================================================================
less        left, right                  left < right
greater     left, right                  left > right
ratio       left, right, min and/or max  min <= left / right <= max
threshold   value, min and/or max        min <= value <= max
within      left, right, tol             |left - right| <= tol * |right|   (tol is relative, 0.05 = 5 %)
order       values (>= 2), strict        values[0] < values[1] < ...  (``<=`` with ``strict: false``)
==========  ===========================  =====================================================================

Evaluation never tunes anything: it returns ``holds`` or ``fails`` with the numbers that decided it, or ``n/a``
when a number is missing (a metric that was not logged, a condition without finished runs, no paper number).

Each kind decides on one or more *checks*: a number and the interval it must fall in (``less``: right - left > 0;
``order``: each step up > 0; ``ratio``: the ratio; ``threshold``: the value; ``within``: the relative difference).
Two more questions are asked of every check, and the report shows both beside the verdict:

* **Resolved?** (:func:`resolution`) The seeds' spread of the check's number (each seed's own numbers, paired by
  seed): a mean that lies closer to its bound than one seed std is *not resolved at our scale*, whichever side
  of the bound it falls on; a tie is not a result either way.
* **How big, beside the paper?** (:func:`size_vs_paper`) The check's number on our means over the same number on
  the paper's, against the claim's ``band``: ``{ratio: [lo, hi]}`` (default ``[0.5, 2]``: the same size within a
  factor of two) or ``{difference: tol}`` (``|ours - paper| <= tol``, for numbers near zero such as a gap in
  accuracy points), or ``none`` where the size means nothing across scales (a p-value).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

ClaimKind = Literal["less", "greater", "ratio", "threshold", "within", "order"]
Status = Literal["holds", "fails", "not resolved", "n/a"]
# (condition, metric) -> number, or None where there is none.
Lookup = Callable[[str, str], "float | None"]

# Which reference fields each kind takes, and which numeric fields it needs (a tuple means "at least one of").
_REF_FIELDS: dict[str, tuple[str, ...]] = {
    "less": ("left", "right"), "greater": ("left", "right"), "ratio": ("left", "right"),
    "threshold": ("value",), "within": ("left", "right"), "order": ("values",),
}
_NEEDS: dict[str, tuple[str, ...]] = {"ratio": ("min", "max"), "threshold": ("min", "max"), "within": ("tol",)}
_CLAIM_KEYS = {"name", "kind", "left", "right", "value", "values", "min", "max", "tol", "strict", "note", "band"}
DEFAULT_BAND = ("ratio", (0.5, 2.0))  # the same size as the paper's within a factor of two


class ClaimError(ValueError):
    """A claim in a study file that cannot be evaluated as written; the message names the field and the fix."""


@dataclass(frozen=True)
class Term:
    """``coef * mean(metric of condition)``."""

    condition: str
    metric: str
    coef: float = 1.0


@dataclass(frozen=True)
class Ref:
    """A number a claim compares: one term, or the sum of several (a contrast or an interaction)."""

    terms: tuple[Term, ...]
    label: str = ""

    def name(self) -> str:
        """How the report names this reference: its ``label``, else ``condition metric`` joined with signs."""
        if self.label:
            return self.label
        parts = []
        for i, t in enumerate(self.terms):
            sign = "-" if t.coef < 0 else ("+" if i else "")
            scale = "" if abs(t.coef) == 1 else f"{abs(t.coef):g}*"
            parts.append(f"{sign} {scale}{t.condition} {t.metric}".strip())
        return " ".join(parts)

    def value(self, lookup: Lookup) -> tuple[float | None, str]:
        """The number, or ``(None, why)`` naming the first missing ``condition metric``."""
        total = 0.0
        for t in self.terms:
            v = lookup(t.condition, t.metric)
            if v is None:
                return None, f"no value for {t.condition} {t.metric}"
            total += t.coef * v
        return total, ""


@dataclass(frozen=True)
class Claim:
    """One checkable statement; see the module docstring for the kinds and their fields."""

    name: str
    kind: ClaimKind
    refs: tuple[Ref, ...]
    min: float | None = None
    max: float | None = None
    tol: float | None = None
    strict: bool = True
    note: str = ""
    band: tuple[str, Any] = DEFAULT_BAND  # ("ratio", (lo, hi)), ("difference", tol) or ("none", None)

    def conditions(self) -> set[str]:
        """The conditions this claim reads."""
        return {t.condition for r in self.refs for t in r.terms}

    def metrics(self) -> set[str]:
        """The metrics this claim reads."""
        return {t.metric for r in self.refs for t in r.terms}


@dataclass(frozen=True)
class Verdict:
    """``holds`` / ``fails`` with the deciding numbers in ``detail``; ``n/a`` with the missing number."""

    status: Status
    detail: str
    numbers: dict[str, float] = field(default_factory=dict)


def _fmt(x: float) -> str:
    """Four significant digits: enough to see a difference, short enough for a table."""
    return f"{x:.4g}"


def _number(raw: Any, where: str) -> float:
    """``raw`` as a float, or a :class:`ClaimError` naming ``where``."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ClaimError(f"{where} must be a number, got {type(raw).__name__} {raw!r}.")
    return float(raw)


def _parse_term(raw: Any, where: str) -> Term:
    """One ``{condition, metric, coef}`` term."""
    keys = set(raw) if isinstance(raw, Mapping) else set()
    if not isinstance(raw, Mapping) or keys - {"condition", "metric", "coef"} or not {"condition", "metric"} <= keys:
        raise ClaimError(
            f"{where} must be a mapping {{condition: NAME, metric: KEY}} (optionally coef: NUMBER), got {raw!r}."
        )
    coef = _number(raw.get("coef", 1.0), f"{where}.coef")
    return Term(str(raw["condition"]), str(raw["metric"]), coef)


def parse_ref(raw: Any, where: str) -> Ref:
    """``{condition, metric}`` or ``{terms: [{condition, metric, coef}, ...], label: TEXT}``."""
    if isinstance(raw, Mapping) and "terms" in raw:
        if set(raw) - {"terms", "label"}:
            raise ClaimError(f"{where} with terms takes only 'terms' and 'label', got keys {sorted(raw)}.")
        terms = raw["terms"]
        if not isinstance(terms, list) or not terms:
            raise ClaimError(f"{where}.terms must be a non-empty list of {{condition, metric, coef}}, got {terms!r}.")
        return Ref(tuple(_parse_term(t, f"{where}.terms[{i}]") for i, t in enumerate(terms)), str(raw.get("label", "")))
    if isinstance(raw, Mapping) and "label" in raw:
        label = str(raw["label"])
        raw = {k: v for k, v in raw.items() if k != "label"}
        return Ref((_parse_term(raw, where),), label)
    return Ref((_parse_term(raw, where),))


def parse_claim(raw: Any, where: str) -> Claim:
    """Build a :class:`Claim` from its YAML mapping; ``where`` (e.g. ``claims[2]``) prefixes every error."""
    if not isinstance(raw, Mapping):
        raise ClaimError(f"{where} must be a mapping with 'name' and 'kind', got {raw!r}.")
    unknown = set(raw) - _CLAIM_KEYS
    if unknown:
        raise ClaimError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(_CLAIM_KEYS)}.")
    kind = raw.get("kind")
    if kind not in _REF_FIELDS:
        raise ClaimError(f"{where}.kind is {kind!r}; choose one of {', '.join(map(repr, _REF_FIELDS))}.")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ClaimError(f"{where}.name must be a non-empty sentence saying what is claimed, got {name!r}.")
    fields = _REF_FIELDS[kind]
    for f in fields:
        if f not in raw:
            raise ClaimError(f"{where} ({kind}) needs '{f}'; a {kind} claim takes {', '.join(fields)}.")
    stray = {"left", "right", "value", "values"} & set(raw) - set(fields)
    if stray:
        raise ClaimError(f"{where} ({kind}) does not take {sorted(stray)}; it takes {', '.join(fields)}.")
    if kind == "order":
        values = raw["values"]
        if not isinstance(values, list) or len(values) < 2:
            raise ClaimError(f"{where}.values must list at least 2 references in ascending order, got {values!r}.")
        refs = tuple(parse_ref(v, f"{where}.values[{i}]") for i, v in enumerate(values))
    else:
        refs = tuple(parse_ref(raw[f], f"{where}.{f}") for f in fields)
    needs = _NEEDS.get(kind, ())
    if needs and not any(raw.get(n) is not None for n in needs):
        raise ClaimError(f"{where} ({kind}) needs {' or '.join(needs)}.")
    bounds = {k: _number(raw[k], f"{where}.{k}") if raw.get(k) is not None else None for k in ("min", "max", "tol")}
    if bounds["tol"] is not None and bounds["tol"] <= 0:
        raise ClaimError(f"{where}.tol must be > 0 (a relative tolerance, 0.05 = 5 %), got {bounds['tol']!r}.")
    strict = raw.get("strict", True)
    if not isinstance(strict, bool):
        raise ClaimError(f"{where}.strict must be true or false, got {strict!r}.")
    return Claim(
        name.strip(), kind, refs, bounds["min"], bounds["max"], bounds["tol"], strict, str(raw.get("note", "")),
        _parse_band(raw.get("band"), f"{where}.band"),
    )


def _parse_band(raw: Any, where: str) -> tuple[str, Any]:
    """``{ratio: [lo, hi]}`` or ``{difference: tol}``; None = :data:`DEFAULT_BAND`."""
    if raw is None:
        return DEFAULT_BAND
    if raw == "none":  # a number whose size says nothing across scales (a p-value grows with the sample)
        return "none", None
    if isinstance(raw, Mapping) and set(raw) == {"ratio"}:
        pair = raw["ratio"]
        if isinstance(pair, list) and len(pair) == 2:
            lo, hi = (_number(x, f"{where}.ratio") for x in pair)
            if 0 < lo <= hi:
                return "ratio", (lo, hi)
    elif isinstance(raw, Mapping) and set(raw) == {"difference"}:
        tol = _number(raw["difference"], f"{where}.difference")
        if tol > 0:
            return "difference", tol
    raise ClaimError(f"{where} must be {{ratio: [lo, hi]}} with 0 < lo <= hi (ours / paper), {{difference: tol}} "
                     f"with tol > 0 (|ours - paper|) or none (no size comparison), got {raw!r}.")


def _bounds_text(lo: float | None, hi: float | None) -> str:
    """What a bounded number had to satisfy, e.g. ``needed >= 2``."""
    if lo is not None and hi is not None:
        return f"needed {_fmt(lo)} <= x <= {_fmt(hi)}"
    return f"needed >= {_fmt(lo)}" if lo is not None else f"needed <= {_fmt(hi)}"


def _in_bounds(x: float, lo: float | None, hi: float | None) -> bool:
    """Inclusive bounds; a missing bound is no constraint."""
    return (lo is None or x >= lo) and (hi is None or x <= hi)


def evaluate(claim: Claim, lookup: Lookup) -> Verdict:
    """Check ``claim`` on the numbers ``lookup`` gives (ours, one seed's, or the paper's).

    NaN numbers (a diverged run) are compared as they are, so a claim on them fails with ``nan`` in the detail.
    """
    values, why = _values(claim, lookup)
    if values is None:
        return Verdict("n/a", why)
    names = [r.name() for r in claim.refs]
    numbers = dict(zip(names, values))
    shown = ", ".join(f"{n} = {_fmt(v)}" for n, v in numbers.items())
    kind = claim.kind
    if kind in ("less", "greater"):
        a, b = values
        ok = a < b if kind == "less" else a > b
        detail = f"{shown}; needed {names[0]} {'<' if kind == 'less' else '>'} {names[1]}"
    elif kind == "ratio":
        a, b = values
        found = checks(claim, values)
        if found is None:
            return Verdict("n/a", f"{shown}; the ratio is undefined because {names[1]} is 0", numbers)
        r = found[0].value
        numbers["ratio"] = r
        ok = _in_bounds(r, claim.min, claim.max)
        # '#' keeps trailing zeros, so a ratio of 1.0002 reads 1.000, not 1.
        detail = (f"ratio {r:#.4g} = {_fmt(a)} / {_fmt(b)} ({names[0]} / {names[1]}); "
                  f"{_bounds_text(claim.min, claim.max)}")
    elif kind == "threshold":
        ok = _in_bounds(values[0], claim.min, claim.max)
        detail = f"{shown}; {_bounds_text(claim.min, claim.max)}"
    elif kind == "within":
        rel = checks(claim, values)[0].value
        numbers["relative difference"] = rel
        ok = rel <= (claim.tol or 0.0)
        detail = f"{shown}; |difference| / |{names[1]}| = {rel:.2%}, needed <= {(claim.tol or 0.0):.2%}"
    else:  # order
        op = "<" if claim.strict else "<="
        broken = [
            i for i in range(len(values) - 1)
            if not (values[i] < values[i + 1] if claim.strict else values[i] <= values[i + 1])
        ]
        ok = not broken
        detail = f"{shown}; needed {f' {op} '.join(names)}"
        if broken:
            i = broken[0]
            detail += f" (first break: {names[i]} {_fmt(values[i])} vs {names[i + 1]} {_fmt(values[i + 1])})"
    return Verdict("holds" if ok else "fails", detail, numbers)


def seed_agreement(claim: Claim, seeds: Sequence[int], lookup_seed: Callable[[int], Lookup]) -> tuple[int, int]:
    """``(holds, decided)``: in how many seeds the claim holds when each seed's own numbers are used, out of the
    seeds where it could be decided (every number present)."""
    verdicts = [evaluate(claim, lookup_seed(s)).status for s in seeds]
    decided = [v for v in verdicts if v != "n/a"]
    return sum(v == "holds" for v in decided), len(decided)


def _values(claim: Claim, lookup: Lookup) -> tuple[list[float] | None, str]:
    """The claim's reference numbers, or ``(None, why)``."""
    values = []
    for ref in claim.refs:
        v, why = ref.value(lookup)
        if v is None:
            return None, why
        values.append(v)
    return values, ""


@dataclass(frozen=True)
class Check:
    """One number a verdict turns on (see the module docstring) and the interval it must fall in."""

    label: str
    value: float
    lo: float | None
    hi: float | None

    def distance(self, x: float) -> float:
        """Distance from ``x`` to the nearest bound, whichever side it is on."""
        return min(abs(x - b) for b in (self.lo, self.hi) if b is not None)


def checks(claim: Claim, values: Sequence[float]) -> list[Check] | None:
    """The claim's checks on ``values`` (its reference numbers); None where a ratio's denominator is 0."""
    names = [r.name() for r in claim.refs]
    kind = claim.kind
    if kind in ("less", "greater"):
        a, b = values if kind == "less" else values[::-1]
        first, second = names if kind == "less" else names[::-1]
        return [Check(f"{second} - {first}", b - a, 0.0, None)]
    if kind == "ratio":
        return None if values[1] == 0 else [Check("ratio", values[0] / values[1], claim.min, claim.max)]
    if kind == "threshold":
        return [Check(names[0], values[0], claim.min, claim.max)]
    if kind == "within":
        a, b = values
        rel = abs(a - b) / abs(b) if b != 0 else (0.0 if a == 0 else math.inf)
        return [Check("relative difference", rel, None, claim.tol)]
    return [Check(f"{names[i + 1]} - {names[i]}", values[i + 1] - values[i], 0.0, None) for i in range(len(values) - 1)]


def resolution(claim: Claim, seed_lookups: Sequence[Lookup]) -> str | None:
    """Why the claim is *not resolved at our scale*, or None when every check is: a check is unresolved when the
    mean of its per-seed numbers lies within one seed std of its bound (two or more seeds needed; with fewer
    there is no spread to judge by, and the verdict stands)."""
    per_seed = []
    for lookup in seed_lookups:
        values, _ = _values(claim, lookup)
        if values is not None and (c := checks(claim, values)) is not None:
            per_seed.append(c)
    if len(per_seed) < 2:
        return None
    for i, check in enumerate(per_seed[0]):
        xs = [seed[i].value for seed in per_seed]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        if math.isfinite(std) and check.distance(mean) < std:
            return (f"{check.label} = {_fmt(mean)} is within one seed std ({_fmt(std)}, {len(xs)} seeds) of its "
                    "bound")
    return None


def size_vs_paper(claim: Claim, ours: Lookup, paper: Lookup) -> tuple[bool, str] | None:
    """``(within the band, "0.45x of the paper's 0.43 ...")`` comparing each check's number on our means with the
    paper's (the worst check decides), or None when the paper gives no numbers for the claim."""
    our_values, _ = _values(claim, ours)
    paper_values, _ = _values(claim, paper)
    if claim.band[0] == "none" or our_values is None or paper_values is None:
        return None
    ours_c, paper_c = checks(claim, our_values), checks(claim, paper_values)
    if ours_c is None or paper_c is None:
        return None
    kind, bound = claim.band
    parts, ok = [], True
    for o, p in zip(ours_c, paper_c):
        if kind == "ratio":
            if p.value == 0:
                return None
            r = o.value / p.value
            ok &= bound[0] <= r <= bound[1]
            parts.append(f"{r:.2f}x ({_fmt(o.value)} vs {_fmt(p.value)})")
        else:
            d = o.value - p.value
            ok &= abs(d) <= bound
            parts.append(f"{d:+.3g} ({_fmt(o.value)} vs {_fmt(p.value)})")
    band = f"{_fmt(bound[0])}-{_fmt(bound[1])}x" if kind == "ratio" else f"±{_fmt(bound)}"
    return ok, f"{'; '.join(parts)}, band {band}"
