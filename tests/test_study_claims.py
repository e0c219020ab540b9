"""Claims written as data: each kind holds or fails with the numbers that decide it; bad claims name the field."""

import math

import pytest

from lightning_moe.studies.claims import ClaimError, evaluate, parse_claim, seed_agreement

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
