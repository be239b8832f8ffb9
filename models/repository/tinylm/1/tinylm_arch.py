"""TinyLM: a small byte-level, decoder-only transformer with a KV cache.

The single definition of the architecture, shared by the training script
(`models/training/train_tinylm.py`, which imports this file by path) and the Triton
Python-backend model next to it (`model.py`). Tokens are the 256 byte values plus one
end-of-sequence token (id 256), so no tokenizer is needed: a prompt's token ids are its
UTF-8 bytes.
"""

from __future__ import annotations

import io
import lzma
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BYTE_VOCAB = 256
EOS_ID = 256
VOCAB_SIZE = BYTE_VOCAB + 1

# One (key, value) pair per layer, each shaped [batch, heads, positions, head_dim].
KVCache = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class TinyLMConfig:
    """Architecture hyper-parameters; saved next to the weights."""

    vocab_size: int = VOCAB_SIZE
    context_length: int = 256
    d_model: int = 64
    n_layer: int = 4
    n_head: int = 4
    dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError("d_model must be a multiple of n_head")
        self.n_head = cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(
        self, x: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        drop = self.dropout if self.training else 0.0
        if past is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        elif t == 1:
            # A single new query may attend to every cached position.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:
            total = k.shape[2]
            mask = torch.ones(t, total, dtype=torch.bool, device=x.device).tril(total - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.proj(y), k, v


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(
        self, x: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.attn(self.ln1(x), past)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return x, k, v


class TinyLM(nn.Module):
    """Decoder-only transformer: learned positions, pre-LN blocks, tied input/output embedding."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: Tensor, past_kv: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """Logits for every position of `tokens` [batch, time], and the grown KV cache.

        With `past_kv`, `tokens` continue the cached sequence: positions start after it.
        """
        start = 0 if past_kv is None else past_kv[0][0].shape[2]
        t = tokens.shape[1]
        if start + t > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds the context of {self.cfg.context_length}"
            )
        pos = torch.arange(start, start + t, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))
        new_kv: KVCache = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, None if past_kv is None else past_kv[i])
            new_kv.append((k, v))
        return self.head(self.ln_f(x)), new_kv


def save_checkpoint(model: TinyLM, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, path)


def load_checkpoint(path: Path) -> TinyLM:
    """Rebuild the model (eval mode) from a file written by `save_checkpoint`, or by the
    optimizer (quantized and/or compressed)."""
    ckpt = read_checkpoint(path)
    return restore(TinyLM(TinyLMConfig(**ckpt["config"])), ckpt)  # type: ignore[return-value]


# A derived version (`tensorgate models optimize`) stores its weights as this same
# checkpoint with "optimization" naming the steps applied, possibly xz-compressed (pruned
# weights are mostly zeros). The loader lives here, not in a shared module: each model
# folder is loaded by Triton on its own and must carry everything it needs.
XZ_MAGIC = b"\xfd7zXZ\x00"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict at `path`, xz-compressed or not."""
    raw = path.read_bytes()
    if raw.startswith(XZ_MAGIC):
        raw = lzma.decompress(raw)
    with warnings.catch_warnings():
        # Quantized tensors load through storage APIs torch marks deprecated.
        warnings.simplefilter("ignore", UserWarning)
        loaded: dict[str, Any] = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    return loaded


def quantized_int8(model: nn.Module) -> nn.Module:
    """`model` with its Linear layers dynamically quantized to int8 (torch's own
    quantize_dynamic: int8 weights, activations quantized per call)."""
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not installed;
        # the eager API still works in the pinned torch.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def restore(model: nn.Module, ckpt: dict[str, Any]) -> nn.Module:
    """`model` (freshly built) shaped as the checkpoint's optimization left it, with its
    weights loaded, in eval mode."""
    if "int8-dynamic" in ckpt.get("optimization", ()):
        model = quantized_int8(model)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
