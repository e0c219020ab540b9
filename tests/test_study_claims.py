"""Claims written as data: each kind holds or fails with the numbers that decide it; bad claims name the field."""

import math

import pytest

from lightning_moe.studies.claims import ClaimError, evaluate, parse_claim, resolution, seed_agreement, size_vs_paper

NUMBERS = {("aux", "maxvio"): 0.526, ("free", "maxvio"): 0.084, ("kmeans", "maxvio"): 0.037,
           ("seq", "maxvio"): 0.102, ("free", "ppl"): 15.01, ("kmeans", "ppl"): 15.40}


def lookup(condition, metric):
    return NUMBERS.get((condition, metric))


def ref(condition, metric="maxvio"):
    return {"condition": condition, "metric": metric}


def check(raw):
    return evaluate(parse_claim({"name": "c"} | raw, "claims[0]"), lookup)


def test_less_holds_and_names_both_numbers():
    v = check({"kind": "less", "left": ref("kmeans"), "right": ref("aux")})
    assert v.status == "holds"
    assert v.detail == "kmeans maxvio = 0.037, aux maxvio = 0.526; needed kmeans maxvio < aux maxvio"


def test_greater_fails_with_the_numbers():
    v = check({"kind": "greater", "left": ref("kmeans"), "right": ref("aux")})
    assert v.status == "fails" and "kmeans maxvio = 0.037, aux maxvio = 0.526" in v.detail


@pytest.mark.parametrize("bounds,status", [({"min": 2}, "holds"), ({"min": 7}, "fails"), ({"max": 6}, "fails"),
                                           ({"min": 6, "max": 6.5}, "holds")])
def test_ratio_against_bounds(bounds, status):
    v = check({"kind": "ratio", "left": ref("aux"), "right": ref("free")} | bounds)
    assert v.status == status
    assert v.numbers["ratio"] == pytest.approx(0.526 / 0.084)
    assert "ratio 6.262 = 0.526 / 0.084 (aux maxvio / free maxvio)" in v.detail


def test_ratio_shows_trailing_zeros():
    NUMBERS[("a", "x")], NUMBERS[("b", "x")] = 1.0002, 1.0
    try:
        v = check({"kind": "ratio", "left": ref("a", "x"), "right": ref("b", "x"), "max": 1.02})
    finally:
        del NUMBERS[("a", "x")], NUMBERS[("b", "x")]
    assert v.detail.startswith("ratio 1.000 =") and v.detail.endswith("needed <= 1.02")


def test_threshold_is_inclusive():
    assert check({"kind": "threshold", "value": ref("kmeans"), "max": 0.037}).status == "holds"
    v = check({"kind": "threshold", "value": ref("kmeans"), "min": 0.05})
    assert (v.status, v.detail) == ("fails", "kmeans maxvio = 0.037; needed >= 0.05")


def test_within_uses_relative_difference():
    ok = check({"kind": "within", "left": ref("kmeans", "ppl"), "right": ref("free", "ppl"), "tol": 0.03})
    assert ok.status == "holds" and "= 2.60%, needed <= 3.00%" in ok.detail
    bad = check({"kind": "within", "left": ref("kmeans", "ppl"), "right": ref("free", "ppl"), "tol": 0.02})
    assert bad.status == "fails" and bad.numbers["relative difference"] == pytest.approx(0.39 / 15.01)


def test_order_names_the_first_break():
    ok = check({"kind": "order", "values": [ref("kmeans"), ref("free"), ref("seq"), ref("aux")]})
    assert ok.status == "holds"
    bad = check({"kind": "order", "values": [ref("free"), ref("kmeans"), ref("aux")]})
    assert bad.status == "fails" and "first break: free maxvio 0.084 vs kmeans maxvio 0.037" in bad.detail


def test_order_strictness():
    NUMBERS[("same", "maxvio")] = 0.084
    try:
        values = [ref("free"), ref("same")]
        assert check({"kind": "order", "values": values}).status == "fails"
        assert check({"kind": "order", "values": values, "strict": False}).status == "holds"
    finally:
        del NUMBERS[("same", "maxvio")]


def test_terms_make_an_interaction():
    interaction = {"terms": [ref("aux") | {"coef": 1}, ref("free") | {"coef": -1}, ref("kmeans") | {"coef": -1}],
                   "label": "interaction"}
    v = check({"kind": "threshold", "value": interaction, "min": 0.4})
    assert v.status == "holds" and v.numbers["interaction"] == pytest.approx(0.526 - 0.084 - 0.037)
    unlabeled = parse_claim({"name": "c", "kind": "threshold", "value": {"terms": interaction["terms"]}, "min": 0},
                            "claims[0]")
    assert unlabeled.refs[0].name() == "aux maxvio - free maxvio - kmeans maxvio"


def test_missing_number_is_not_a_verdict():
    v = check({"kind": "less", "left": ref("kmeans"), "right": ref("nobody")})
    assert (v.status, v.detail) == ("n/a", "no value for nobody maxvio")


def test_nan_fails_visibly():
    NUMBERS[("diverged", "maxvio")] = math.nan
    try:
        v = check({"kind": "less", "left": ref("diverged"), "right": ref("aux")})
    finally:
        del NUMBERS[("diverged", "maxvio")]
    assert v.status == "fails" and "diverged maxvio = nan" in v.detail


def test_seed_agreement_counts_decided_seeds():
    per_seed = {0: {"a": 1.0, "b": 2.0}, 1: {"a": 3.0, "b": 2.0}, 2: {"a": 1.0}}
    claim = parse_claim({"name": "a below b", "kind": "less", "left": ref("a", "m"), "right": ref("b", "m")}, "c")
    assert seed_agreement(claim, [0, 1, 2], lambda s: lambda c, m: per_seed[s].get(c)) == (1, 2)


def _seeds(*pairs):
    """One lookup per seed over conditions a and b of metric m."""
    return [lambda c, m, a=a, b=b: {"a": a, "b": b}[c] for a, b in pairs]


LESS = {"name": "a below b", "kind": "less", "left": ref("a", "m"), "right": ref("b", "m")}


def test_a_difference_within_one_seed_std_is_not_resolved():
    # b - a per seed: 0.1, -0.05, 0.1 -> mean 0.05, std 0.0866 > 0.05
    why = resolution(parse_claim(LESS, "c"), _seeds((1.0, 1.1), (1.05, 1.0), (1.0, 1.1)))
    assert why == "b m - a m = 0.05 is within one seed std (0.0866, 3 seeds) of its bound"


def test_a_difference_beyond_the_seed_std_is_resolved_either_way():
    assert resolution(parse_claim(LESS, "c"), _seeds((1.0, 1.5), (1.0, 1.6), (1.0, 1.4))) is None
    assert resolution(parse_claim(LESS, "c"), _seeds((1.5, 1.0), (1.6, 1.0), (1.4, 1.0))) is None  # clearly fails


def test_one_seed_has_no_spread_to_judge_by():
    assert resolution(parse_claim(LESS, "c"), _seeds((1.0, 1.01))) is None


def test_threshold_near_its_bound_is_not_resolved():
    claim = parse_claim({"name": "t", "kind": "threshold", "value": ref("a", "m"), "min": 0.8}, "c")
    assert resolution(claim, _seeds((0.79, 0), (0.85, 0), (0.75, 0))) is not None
    assert resolution(claim, _seeds((0.95, 0), (0.96, 0), (0.94, 0))) is None


def test_size_vs_paper_is_the_ratio_of_the_deciding_numbers_against_the_band():
    claim = parse_claim({"name": "t", "kind": "threshold", "value": ref("a", "m"), "min": 0}, "c")
    ours, paper = (lambda c, m: 0.17), (lambda c, m: 0.43)
    assert size_vs_paper(claim, ours, paper) == (False, "0.40x (0.17 vs 0.43), band 0.5-2x")
    wide = parse_claim({"name": "t", "kind": "threshold", "value": ref("a", "m"), "min": 0,
                        "band": {"ratio": [0.3, 3]}}, "c")
    assert size_vs_paper(wide, ours, paper)[0] is True


def test_size_vs_paper_of_an_order_is_its_gap_and_a_difference_band_is_absolute():
    claim = parse_claim(LESS | {"band": {"difference": 0.05}}, "c")
    ours = lambda c, m: {"a": 0.29, "b": 0.40}[c]  # noqa: E731
    paper = lambda c, m: {"a": 0.10, "b": 0.53}[c]  # noqa: E731
    assert size_vs_paper(claim, ours, paper) == (False, "-0.32 (0.11 vs 0.43), band ±0.05")


def test_a_band_that_is_neither_a_ratio_nor_a_difference_names_the_field():
    with pytest.raises(ClaimError, match=r"claims\[0\]\.band must be \{ratio: \[lo, hi\]\}"):
        parse_claim(LESS | {"band": {"ratio": [2, 1]}}, "claims[0]")


def test_size_vs_paper_needs_the_papers_numbers():
    claim = parse_claim(LESS, "c")
    assert size_vs_paper(claim, lambda c, m: 1.0, lambda c, m: None) is None


@pytest.mark.parametrize("raw,match", [
    ({"kind": "bigger"}, r"claims\[0\]\.kind is 'bigger'; choose one of 'less', 'greater'"),
    ({"kind": "less", "left": {"condition": "a", "metric": "m"}}, r"\(less\) needs 'right'"),
    ({"kind": "ratio", "left": {"condition": "a", "metric": "m"}, "right": {"condition": "b", "metric": "m"}},
     r"\(ratio\) needs min or max"),
    ({"kind": "within", "left": {"condition": "a", "metric": "m"}, "right": {"condition": "b", "metric": "m"},
      "tol": -1}, r"tol must be > 0"),
    ({"kind": "threshold", "value": {"condition": "a"}, "min": 1}, r"value must be a mapping \{condition: NAME"),
    ({"kind": "threshold", "value": {"condition": "a", "metric": "m"}, "min": "high"}, r"min must be a number"),
    ({"kind": "threshold", "left": {"condition": "a", "metric": "m"}, "value": {"condition": "a", "metric": "m"},
      "min": 1}, r"does not take \['left'\]"),
    ({"kind": "order", "values": [{"condition": "a", "metric": "m"}]}, r"at least 2 references"),
    ({"kind": "less", "lft": 1}, r"unknown key\(s\) \['lft'\]"),
])
def test_bad_claims_name_the_field(raw, match):
    with pytest.raises(ClaimError, match=match):
        parse_claim({"name": "c"} | raw, "claims[0]")
