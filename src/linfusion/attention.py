"""The module that replaces one UNet self-attention (``attn1``): generalized linear attention.

It is a plain ``nn.Module``, not a diffusers ``Attention``: diffusers' processor machinery
(``set_attn_processor``, ``load_ip_adapter``, ``set_default_attn_processor``, ``fuse_qkv_projections``,
xformers) only visits modules that expose ``set_processor``, so it leaves LinFusion layers alone and keeps
working on the cross-attention layers. The flip side, documented for users: attention processors are
ignored by LinFusion's ``attn1`` layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .ops import linear_attention


def _pre_projection(dim: int, mid_dim: int | None) -> nn.Module:
    """The residual non-linear pre-projection MLP on the query and key inputs (identity when ``mid_dim == -1``).

    Indices matter for checkpoint compatibility: 0 = Linear, 1 = LayerNorm, 2 = LeakyReLU, 3 = Linear.
    """
    if mid_dim == -1:
        return nn.Identity()
    mid = dim if mid_dim is None else int(mid_dim)
    if mid <= 0:
        raise ValueError(f"projection_mid_dim must be None, -1 or a positive int; got {mid_dim!r}")
    return nn.Sequential(nn.Linear(dim, mid), nn.LayerNorm(mid), nn.LeakyReLU(0.01), nn.Linear(mid, dim))


class GeneralizedLinearAttention(nn.Module):
    """Normalized, non-causal linear self-attention with residual MLP pre-projections on q and k.

    ``bias`` gives q/k/v biases, as the self-attention of PixArt's transformer blocks has (the published
    UNet checkpoints have none).

    ``q = to_q(x + to_q_(x))``, ``k = to_k(x + to_k_(x))``, ``v = to_v(x)``; then
    :func:`linfusion.ops.linear_attention` per head, then ``to_out`` (Linear, Dropout). Submodule names match
    the published checkpoints and diffusers' ``Attention``, so state dicts load and LoRA finds ``to_q`` etc.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        projection_mid_dim: int | None = None,
        eps: float = 1e-4,
        backend: str = "auto",
        bias: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.projection_mid_dim = projection_mid_dim
        self.eps = eps
        self.backend = backend
        self.bias = bias
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(dim, dim, bias=bias)
        self.to_v = nn.Linear(dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.to_q_ = _pre_projection(dim, projection_mid_dim)
        self.to_k_ = _pre_projection(dim, projection_mid_dim)

    def extra_repr(self) -> str:
        text = f"dim={self.dim}, heads={self.heads}, projection_mid_dim={self.projection_mid_dim}"
        return text + (", bias=True" if self.bias else "")

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **cross_attention_kwargs: Any,
    ) -> torch.Tensor:
        """Self-attention over ``hidden_states`` (B, N, C) or (B, C, H, W).

        ``encoder_hidden_states``, ``attention_mask`` and any ``cross_attention_kwargs`` (LoRA ``scale``,
        IP-Adapter masks, ...) are accepted for drop-in compatibility with diffusers' ``attn1`` call and
        ignored: LinFusion attends over the input itself, unmasked, as the published model does.
        """
        spatial_shape = None
        if hidden_states.ndim == 4:
            batch, channels, height, width = hidden_states.shape
            spatial_shape = (height, width)
            hidden_states = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)

        query = self.to_q(hidden_states + self.to_q_(hidden_states))
        key = self.to_k(hidden_states + self.to_k_(hidden_states))
        value = self.to_v(hidden_states)

        out = self.attend(self._split_heads(query), self._split_heads(key), self._split_heads(value))
        batch, _, tokens, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, tokens, self.dim)
        out = self.to_out[1](self.to_out[0](out))

        if spatial_shape is not None:
            out = out.transpose(1, 2).reshape(batch, self.dim, *spatial_shape)
        return out

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The attention itself on (B, h, N, d) heads; spatial parallelism swaps this one step per instance."""
        return linear_attention(query, key, value, eps=self.eps, backend=self.backend)

    @torch.no_grad()
    def init_from_attention(self, attention: nn.Module) -> None:
        """Start from a teacher ``attn1``: copy its q/k/v/out projections and zero the MLPs' last Linear.

        With the last Linear of ``to_q_``/``to_k_`` at zero the pre-projections start as the identity, so
        the student's q, k, v are exactly the teacher's at step 0 (only the attention kernel differs).
        """
        for name in ("to_q", "to_k", "to_v"):
            source, target = getattr(attention, name), getattr(self, name)
            target.weight.copy_(source.weight)
            if (source.bias is None) != (target.bias is None):
                raise ValueError(
                    f"teacher {name} {'has' if source.bias is not None else 'has no'} bias but this LinFusion "
                    f"layer was built with bias={self.bias}"
                )
            if source.bias is not None:
                target.bias.copy_(source.bias)
        self.to_out[0].weight.copy_(attention.to_out[0].weight)
        if attention.to_out[0].bias is not None:
            self.to_out[0].bias.copy_(attention.to_out[0].bias)
        else:
            self.to_out[0].bias.zero_()
        for mlp in (self.to_q_, self.to_k_):
            if isinstance(mlp, nn.Sequential):
                mlp[3].weight.zero_()
                mlp[3].bias.zero_()
