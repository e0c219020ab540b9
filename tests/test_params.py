"""The parameter calculator against published models, the sparsity spec's tables and our own model."""

import pytest

from lightning_moe.models import MoETransformer
from lightning_moe.params import MoEShape, count, main, solve

OLMOE = MoEShape(2048, 16, 64, 8, 1024, vocab_size=50304, n_heads=16, tied_embeddings=False, qk_norm=True)


def test_olmoe_1b_7b_matches_published_totals():
    c = count(OLMOE)
    assert round(c["total"] / 1e9, 1) == 6.9 and round(c["active"] / 1e9, 1) == 1.3
    assert c["total"] == 6_919_161_856


def test_counts_match_the_parameters_of_our_model():
    shape = MoEShape(48, 3, 8, 2, 40, vocab_size=256, n_heads=4)
    model = MoETransformer(256, 48, 3, 4, d_ff=40, num_experts=8, top_k=2)
    assert count(shape)["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "E,k,total,active",
    [(4, 2, 1.440, 0.776), (8, 1, 1.441, 0.279), (16, 4, 1.443, 0.448), (32, 32, 1.448, 1.448)],
)
def test_family1_table_of_the_sparsity_spec(E, k, total, active):
    c = count(MoEShape(96, 3, E, k, 1536 // E, n_heads=3))
    assert (round(c["total_nonemb"] / 1e6, 3), round(c["active_nonemb"] / 1e6, 3)) == (total, active)


@pytest.mark.parametrize("E,k,d,total,active", [(4, 1, 224, 1.510, 0.832), (16, 2, 136, 1.561, 0.396)])
def test_family2_table_of_the_sparsity_spec(E, k, d, total, active):
    c = count(MoEShape(d, 3, E, k, d // 2))
    assert (round(c["total_nonemb"] / 1e6, 3), round(c["active_nonemb"] / 1e6, 3)) == (total, active)


def test_sparsity_and_flops():
    c = count(MoEShape(64, 2, 8, 2, 32, vocab_size=256, seq_len=16))
    assert c["sparsity"] == 4 and c["activation_ratio"] == 0.25
    assert c["train_flops_per_token"] == 3 * (2 * c["active_nonemb"] + 2 * 256 * 64 + 2 * 2 * 16 * 64)


def test_solve_with_tied_expert_width_finds_the_spec_example():
    err, shape, _ = solve(1.5e6, 8, 2, n_layers=(3,), expert_ratio=0.5)[0]
    assert (shape.d_model, shape.d_expert) == (176, 88) and err < 0.01


def test_solve_with_both_budgets_binding():
    err, shape, c = solve(2.0e6, 8, 2, active=0.6e6)[0]
    assert err < 0.01
    assert abs(c["total_nonemb"] / 2.0e6 - 1) < 0.01 and abs(c["active_nonemb"] / 0.6e6 - 1) < 0.01


def test_solve_rejects_active_above_total():
    with pytest.raises(ValueError, match="active <= total"):
        solve(1e6, 8, 2, active=2e6)


def test_shape_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match="top_k=9 exceeds num_experts=8"):
        MoEShape(64, 2, 8, 9, 32)


def test_command_line_prints_counts(capsys):
    main(["--d_model", "96", "--n_layers", "3", "--n_heads", "3", "--num_experts", "8", "--top_k", "2",
          "--d_expert", "192"])
    out = capsys.readouterr().out
    assert "total_nonemb" in out and "1.441M" in out and "sparsity" in out
