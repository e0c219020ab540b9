"""A decoder-only MoE transformer you can read in one sitting: pre-norm, causal attention, MoE FFNs.

Legend: B batch, S sequence, D model width, H heads, V vocabulary.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.experts.native import Activation, Backend
from lightning_moe.gating.base import Router
from lightning_moe.layers import DenseFFN, MoELayer
from lightning_moe.utils import DeferredChecks, check_now, check_positive_int


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BSD: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


def rope_tables(seq_len: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ffn_norm = nn.RMSNorm(d_model)
        self.ffn = ffn

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.ffn(self.ffn_norm(x))


class MoETransformer(nn.Module):
    """Decoder-only language model whose FFNs are MoE layers (every ``moe_every``-th layer; the rest dense).

    Args:
        vocab_size: number of token ids V.
        d_model: width D (divisible by ``n_heads``, head width even for rotary embeddings).
        n_layers: transformer blocks.
        n_heads: attention heads.
        d_ff: width of each expert (and of dense FFN layers).
        num_experts: routed experts per MoE layer.
        top_k: experts per token.
        moe_every: 1 = MoE in every block; n = blocks n-1, 2n-1, ... are MoE, the rest dense.
        router: router prototype; each MoE layer gets its own deep copy, bound to its dimensions.
        activation: ``swiglu`` or ``gelu``.
        backend: experts backend, ``native`` or ``megablocks``.
        shared_d_ff: width of an always-on shared expert per MoE layer; 0 = none.
        max_seq_len: longest sequence the rotary tables cover.
        tie_embeddings: share the input embedding with the output head.
        check_inputs: check that token ids lie in ``[0, vocab_size)``. ``None`` (default): at once on CPU, where it
            is free; on a GPU the result stays on the device (ids are clamped for the embedding lookup, so a bad id
            cannot trip a device-side assert first) and is read once per optimizer step by
            :func:`lightning_moe.layers.raise_deferred_checks`. ``True``: at once everywhere (a host sync per
            batch); ``False``: never. ``MoELanguageModel`` applies the same rule to the labels.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 256,
        num_experts: int = 8,
        top_k: int = 2,
        moe_every: int = 1,
        router: Router | None = None,
        activation: Activation = "swiglu",
        backend: Backend = "native",
        shared_d_ff: int = 0,
        max_seq_len: int = 512,
        tie_embeddings: bool = True,
        check_inputs: bool | None = None,
    ) -> None:
        super().__init__()
        if check_inputs is not None and not isinstance(check_inputs, bool):
            raise TypeError(f"check_inputs must be True, False or None, got {check_inputs!r}.")
        self.check_inputs = check_inputs
        self.deferred_checks = DeferredChecks()  # GPU flags of check_inputs=None, read at the optimizer step
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers),
                            ("n_heads", n_heads), ("moe_every", moe_every), ("max_seq_len", max_seq_len)):
            check_positive_int(name, value)
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(
                f"d_model={d_model} must split into n_heads={n_heads} heads of even width (rotary embeddings); "
                "choose d_model divisible by 2*n_heads."
            )
        self.vocab_size, self.max_seq_len, self.head_dim = vocab_size, max_seq_len, d_model // n_heads
        self.embed = nn.Embedding(vocab_size, d_model)
        blocks = []
        for i in range(n_layers):
            if (i + 1) % moe_every == 0:
                layer_router = copy.deepcopy(router) if router is not None else None
                if layer_router is not None:
                    layer_router.causal = True  # decoder: routers that would read later tokens refuse to build
                ffn: nn.Module = MoELayer(
                    d_model, d_ff, num_experts, top_k, layer_router, activation, backend, shared_d_ff,
                )
                ffn.name = f"blocks.{i}.ffn"
            else:
                ffn = DenseFFN(d_model, d_ff, activation)
            blocks.append(Block(d_model, n_heads, ffn))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=d_model**-0.5)
        # GPT-2's residual scaling: each block adds two branches, so shrink their output projections by
        # 1/sqrt(2*n_layers) to keep the residual stream's variance flat with depth.
        for name, p in self.named_parameters():
            # Every FFN output projection: dense FFNs and shared experts (`w2.weight`), routed experts (`mlp.w2`).
            if name.endswith(("attn.proj.weight", ".w2.weight", "mlp.w2")):
                with torch.no_grad():
                    p.mul_((2 * n_layers) ** -0.5)

    def forward(self, tokens_BS: Tensor) -> Tensor:
        """Token ids ``[B, S]`` -> logits ``[B, S, V]``."""
        if tokens_BS.dim() != 2 or tokens_BS.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an integer tensor [batch, seq], got {tokens_BS.dtype} {tuple(tokens_BS.shape)}.")
        S = tokens_BS.shape[1]
        if S > self.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={self.max_seq_len}; raise max_seq_len.")
        if tokens_BS.numel() and self.check_inputs is not False and not torch.compiler.is_compiling():
            if check_now(self.check_inputs, tokens_BS):
                lo, hi = torch.stack([tokens_BS.min(), tokens_BS.max()]).tolist()  # one sync (free on CPU)
                if lo < 0 or hi >= self.vocab_size:
                    raise ValueError(
                        f"token ids must lie in [0, vocab_size={self.vocab_size}), got [{lo}, {hi}]; set vocab_size "
                        "to the tokenizer's vocabulary size."
                    )
            else:
                bad = (tokens_BS.min() < 0) | (tokens_BS.max() >= self.vocab_size)
                self.deferred_checks.add(ValueError, f"token ids must lie in [0, vocab_size={self.vocab_size}) and a "
                                         "batch had one outside; set vocab_size to the tokenizer's vocabulary size.", bad)
                # Same lookup for every valid id; a bad one reads a valid row until the check raises.
                tokens_BS = tokens_BS.clamp(0, self.vocab_size - 1)
        x = self.embed(tokens_BS)
        rope = rope_tables(S, self.head_dim, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.norm(x))
