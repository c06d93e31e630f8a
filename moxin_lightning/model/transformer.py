"""The Moxin / Mistral decoder: pre-norm blocks of grouped-query attention and a SwiGLU MLP.

Reads top to bottom like nanoGPT. Single device only: sharding, activation checkpointing and
compilation are applied from outside (moxin_lightning.tasks.base). Module names mirror the
Hugging Face Mistral layout so checkpoints map one to one (see moxin_lightning.hf).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moxin_lightning.losses import linear_cross_entropy, token_logprobs
from moxin_lightning.model.attention import AttentionLayout, get_kernel
from moxin_lightning.model.cache import RollingKVCache
from moxin_lightning.model.config import ModelConfig
from moxin_lightning.model.rope import apply_rope, positions_from_documents, rope_tables


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (as Mistral does), scaled after casting back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.kv_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.kv_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.kernel = get_kernel(config.attention)

    def forward(self, x, cos, sin, layout: AttentionLayout, cache: RollingKVCache | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = self.kernel(q, k, v, layout)  # (B, n_heads, T, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, layout: AttentionLayout, cache: RollingKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, layout, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab).

    Build it on the meta device for large presets (`with torch.device("meta"): Transformer(cfg)`),
    then `to_empty(device=...)` and `init_weights()`, or load a checkpoint with `assign=True`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: RollingKVCache | None = None,
        targets: torch.Tensor | None = None,
        target_weights: torch.Tensor | None = None,
        target_logprobs: bool = False,
        target_entropy: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab), or what `head` makes of the hidden states: with `targets` (B, T) the summed
        next-token cross-entropy and the number of counted targets (`target_weights` scales each token's loss),
        with `target_logprobs` the log-probability of each target (and with `target_entropy` the entropy of each
        counted position's distribution too, as a pair); with `logits_at` (B,) only the logits at that
        column of each row, (B, vocab) (a prefill needs only each prompt's last). Everything goes through
        `forward` so that sharding wrappers (FSDP2) gather the embedding and the head themselves: a caller never
        unshards by hand."""
        hidden = self.hidden_states(input_ids, doc_ids=doc_ids, positions=positions, cache=cache)
        if logits_at is not None:
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), logits_at]
        return self.head(
            hidden,
            targets,
            target_weights=target_weights,
            target_logprobs=target_logprobs,
            target_entropy=target_entropy,
        )

    def head(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        target_weights: torch.Tensor | None = None,
        target_logprobs: bool = False,
        target_entropy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The output head, the one surface from final hidden states to what a caller needs: logits (..., vocab);
        with `targets` the fused next-token loss (summed) and the count of counted targets, never storing the
        logits (`losses.linear_cross_entropy`); with `target_logprobs` each target's log-probability, 0 where it is
        ignored (DPO, GRPO), and with `target_entropy` also each counted position's entropy (GRPO's entropy
        bonus), from the same chunked logits. Decoding, evaluation and the tasks all use it."""
        if target_entropy and not (targets is not None and target_logprobs):
            raise ValueError("target_entropy comes with target_logprobs: pass targets and target_logprobs=True")
        if targets is not None and target_logprobs:
            return token_logprobs(hidden, self.lm_head.weight, targets, with_entropy=target_entropy)
        if targets is not None:
            return linear_cross_entropy(hidden, self.lm_head.weight, targets, weights=target_weights)
        return self.lm_head(hidden)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: RollingKVCache | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, dim): the input of `lm_head`.

        doc_ids (B, T): document of each token in a packed row; positions restart at each document
            and attention never crosses a boundary.
        positions (B, T): RoPE positions; by default 0..T-1 (or per document). With a cache they are
            required: each row's absolute positions, -1 for padding.
        """
        batch, length = input_ids.shape
        if cache is not None:
            if positions is None:
                raise ValueError("decoding with a cache needs explicit positions (B, T); use moxin_lightning.generate")
            if doc_ids is not None:
                raise ValueError("doc_ids (packed documents) cannot be combined with a KV cache")
            hidden = self.run_layers(input_ids, positions, cache.prepare(positions), cache)
            cache.commit()
            return hidden
        if length > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {length} tokens exceeds max_seq_len={self.config.max_seq_len}; "
                "shorten it or raise model max_seq_len"
            )
        if positions is None:
            if doc_ids is not None:
                positions = positions_from_documents(doc_ids)
            else:
                positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        layout = AttentionLayout.self_attention(length, self.config.sliding_window, doc_ids)
        return self.run_layers(input_ids, positions, layout)

    def run_layers(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        layout: AttentionLayout,
        cache: RollingKVCache | None = None,
    ) -> torch.Tensor:
        """Embedding, blocks and final norm for a prepared layout: the part with no data-dependent
        control flow, which `torch.compile` captures as one graph (generate compiles it for decoding)."""
        x = self.embed(input_ids)
        cos, sin = rope_tables(positions.clamp(min=0), self.config.head_dim, self.config.rope_theta, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, layout, cache)
        return self.norm(x)

    def initial_std(self, name: str) -> float | None:
        """Standard deviation of the normal initialisation of parameter `name`; None for norm weights (ones).

        N(0, init_std) for every matrix; the two residual-branch outputs of each block (attention `o_proj`,
        MLP `down_proj`) are scaled by 1/sqrt(2 * n_layers) (GPT-2's rule) so the residual stream's variance
        does not grow with depth. A rule by name lets a sharded model initialise each parameter exactly as
        the single-device one does (`tasks.parallelize.initialise`)."""
        if name.endswith("norm.weight"):
            return None
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            return self.config.init_std / math.sqrt(2 * self.config.n_layers)
        return self.config.init_std

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter by `initial_std`."""
        for name, param in self.named_parameters():
            std = self.initial_std(name)
            if std is None:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Bit-identical state dicts: same names, dtypes and values (round-trip checks use it)."""
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(
        left[k].dtype == right[k].dtype and torch.equal(left[k], right[k]) for k in left
    )
