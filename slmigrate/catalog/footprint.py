"""Parameters and memory of a dense decoder-only transformer, computed from its shape (never guessed).

The formulas (all sizes in bytes; GiB = 2**30 bytes). A shape gives L layers, hidden size h, MLP size i, a query
heads, k key/value heads, head size d (default h/a), vocabulary V, tied or untied embeddings, a gated (3 matrix,
SwiGLU/GeGLU) or plain (2 matrix) MLP, optional q/k/v biases and q/k norms, and ``extra_params`` for parts outside
the decoder (e.g. a vision encoder).

Parameters
    attention  = h*a*d + 2*h*k*d + a*d*h   (+ a*d + 2*k*d with q/k/v biases)
    mlp        = 3*h*i (gated) or 2*h*i
    norms      = 2*h per layer (+ 2*d with q/k norms) + h final
    P          = L*(attention + mlp + norms) + V*h (+ V*h untied) + h + extra_params
    P_linear   = L*(attention + mlp) matrices only: what 4-bit quantisation and LoRA act on

LoRA adapters, rank r (default 16) on every attention and MLP matrix of every layer:
    N_lora     = L*r*[(h + a*d) + 2*(h + k*d) + (a*d + h) + (3 or 2)*(h + i)]
    optimizer  = 16 bytes per LoRA parameter (fp32 weight 4 + gradient 4 + Adam moments 8)

Weights
    bf16       = 2*P
    4-bit      = P_linear*4.127/8 + 2*(P - P_linear)   NF4 with double quantisation (~0.127 bits per weight of
                                                      block constants); embeddings, norms, lm_head stay bf16
    fp32       = 4*P                                  CPU training: PyTorch CPU kernels train in fp32

Activations for T = sequence length x batch tokens, with gradient checkpointing (the fine-tune turns it on),
b bytes per activation value (2 on GPU in bf16, 4 on CPU in fp32):
    checkpoints = L*T*h*b                 each layer's input, kept for the backward pass
    one layer   = T*(17*h + 3*i)*b        the layer being recomputed (q/k/v/o, norms, SDPA output, MLP)
    logits      = 8*T*V                   fp32 logits and their gradient (the loss upcasts)

Training   = weights + 16*N_lora + activations + overhead (1 GiB GPU context, 1.5 GiB CPU runtime)
Serving    = weights + KV cache 2*L*k*d*T*b + the same overhead

These are estimates of peak memory for planning; real peaks vary by a few percent with the allocator, kernels
and sequence packing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GIB = float(1 << 30)
NF4_BITS = 4.127  # 4 bits + double-quantised block constants (bitsandbytes, block size 64)
LORA_RANK = 16
LORA_BYTES_PER_PARAM = 16  # fp32 weight + fp32 grad + two fp32 Adam moments
GPU_OVERHEAD = 1.0 * GIB
CPU_OVERHEAD = 1.5 * GIB
DEFAULT_SEQ_LEN = 2048


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    head_dim: int | None = None
    gated_mlp: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    extra_params: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Shape":
        return cls(**data)

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def linear_params(s: Shape) -> int:
    """Weights of the attention and MLP matrices of all layers."""
    attn = s.hidden * s.heads * s.d + 2 * s.hidden * s.kv_heads * s.d + s.heads * s.d * s.hidden
    mlp = (3 if s.gated_mlp else 2) * s.hidden * s.intermediate
    return s.layers * (attn + mlp)


def params(s: Shape) -> int:
    per_layer_small = 2 * s.hidden
    if s.qkv_bias:
        per_layer_small += s.heads * s.d + 2 * s.kv_heads * s.d
    if s.qk_norm:
        per_layer_small += 2 * s.d
    embeddings = s.vocab * s.hidden * (1 if s.tied_embeddings else 2)
    return linear_params(s) + s.layers * per_layer_small + embeddings + s.hidden + s.extra_params


def lora_params(s: Shape, rank: int = LORA_RANK) -> int:
    q_o = 2 * (s.hidden + s.heads * s.d)
    k_v = 2 * (s.hidden + s.kv_heads * s.d)
    mlp = (3 if s.gated_mlp else 2) * (s.hidden + s.intermediate)
    return s.layers * rank * (q_o + k_v + mlp)


def weights_bytes(s: Shape, precision: str) -> float:
    p = params(s)
    if precision == "bf16":
        return 2.0 * p
    if precision == "fp32":
        return 4.0 * p
    if precision == "4bit":
        lin = linear_params(s)
        return lin * NF4_BITS / 8 + 2.0 * (p - lin)
    raise ValueError(f"unknown precision {precision!r}")


def activation_bytes(s: Shape, tokens: int, bytes_per_value: int) -> float:
    checkpoints = s.layers * tokens * s.hidden * bytes_per_value
    one_layer = tokens * (17 * s.hidden + 3 * s.intermediate) * bytes_per_value
    logits = 8.0 * tokens * s.vocab
    return checkpoints + one_layer + logits


def kv_cache_bytes(s: Shape, tokens: int, bytes_per_value: int) -> float:
    return 2.0 * s.layers * s.kv_heads * s.d * tokens * bytes_per_value


@dataclass(frozen=True)
class Footprint:
    """Memory in GiB for one model at ``seq_len`` x ``batch`` tokens."""

    params: int
    lora_params: int
    seq_len: int
    batch: int
    weights_bf16: float
    weights_4bit: float
    lora_gpu: float  # LoRA on bf16 weights, GPU
    qlora_gpu: float  # LoRA on 4-bit weights, GPU
    lora_cpu: float  # LoRA on fp32 weights, CPU
    serve_gpu_bf16: float
    serve_gpu_4bit: float
    serve_cpu: float  # fp32 weights on CPU

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def footprint(s: Shape, seq_len: int = DEFAULT_SEQ_LEN, batch: int = 1, rank: int = LORA_RANK) -> Footprint:
    tokens = seq_len * batch
    n_lora = lora_params(s, rank)
    adapter = LORA_BYTES_PER_PARAM * n_lora
    act16 = activation_bytes(s, tokens, 2)
    act32 = activation_bytes(s, tokens, 4)
    w16, w4, w32 = weights_bytes(s, "bf16"), weights_bytes(s, "4bit"), weights_bytes(s, "fp32")
    return Footprint(
        params=params(s), lora_params=n_lora, seq_len=seq_len, batch=batch,
        weights_bf16=w16 / GIB, weights_4bit=w4 / GIB,
        lora_gpu=(w16 + adapter + act16 + GPU_OVERHEAD) / GIB,
        qlora_gpu=(w4 + adapter + act16 + GPU_OVERHEAD) / GIB,
        lora_cpu=(w32 + adapter + act32 + CPU_OVERHEAD) / GIB,
        serve_gpu_bf16=(w16 + kv_cache_bytes(s, tokens, 2) + GPU_OVERHEAD) / GIB,
        serve_gpu_4bit=(w4 + kv_cache_bytes(s, tokens, 2) + GPU_OVERHEAD) / GIB,
        serve_cpu=(w32 + kv_cache_bytes(s, tokens, 4) + CPU_OVERHEAD) / GIB,
    )
