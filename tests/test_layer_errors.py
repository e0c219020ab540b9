"""Bad input to the MoE layer gets a clear error naming the field, the value and the fix."""

import pytest
import torch

from lightning_moe import MoELayer


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(top_k=5), ValueError, "top_k=5 exceeds num_experts=4"),
        (dict(d_model=0), ValueError, "d_model must be > 0"),
        (dict(d_ff=-3), ValueError, "d_ff must be > 0"),
        (dict(num_experts=0), ValueError, "num_experts must be > 0"),
        (dict(top_k=1.5), TypeError, "top_k must be an integer, got float 1.5"),
        (dict(activation="relu"), ValueError, "Unknown activation 'relu'; choose one of 'swiglu', 'gelu'"),
        (dict(backend="triton"), ValueError, "Unknown backend 'triton'; choose one of 'native', 'megablocks'"),
        (dict(router="softmax"), TypeError, "router must be a lightning_moe Router"),
        (dict(shared_d_ff=-1), ValueError, "shared_d_ff must be >= 0"),
    ],
)
def test_bad_config_is_rejected(kwargs, error, match):
    args = dict(d_model=8, d_ff=16, num_experts=4, top_k=2) | kwargs
    with pytest.raises(error, match=match):
        MoELayer(**args)


def test_wrong_last_dimension_names_d_model():
    with pytest.raises(ValueError, match=r"d_model=8, got shape \(3, 7\)"):
        MoELayer(8, 16, 4, 2)(torch.randn(3, 7))


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="floating point"):
        MoELayer(8, 16, 4, 2)(torch.ones(3, 8, dtype=torch.long))


def test_empty_input_is_rejected():
    with pytest.raises(ValueError, match="empty input"):
        MoELayer(8, 16, 4, 2)(torch.randn(0, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_the_layer(bad):
    layer = MoELayer(8, 16, 4, 2)
    layer.name = "blocks.3.ffn"
    x = torch.randn(2, 4, 8)
    x[1, 2, 5] = bad
    with pytest.raises(ValueError, match="blocks.3.ffn: non-finite router scores"):
        layer(x)
