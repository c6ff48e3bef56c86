"""A Llama-architecture decoder in plain PyTorch that reads and writes the Hugging Face layout.

GQA, RoPE (rotate-half layout, as Hugging Face's Llama), RMSNorm, SwiGLU, tied or untied
embeddings. Checkpoints are `config.json` (architectures ["LlamaForCausalLM"]) plus
`model.safetensors` with the standard tensor names; loading checks every tensor name and shape
against the config and refuses anything else with a `WeightsError` that names the file.

Hooks for the eviction trainers (Locret retaining heads, Attention-Gate gates):
- `Capture` asks `forward` to keep, per layer, the normalized layer input, the pre-RoPE q, k, v
  and/or the pre-softmax attention logits (scaled by 1/sqrt(head_dim), causal positions -inf).
- `attn_bias`, a callable `(layer_idx, x_normed, q, k, v) -> Tensor | None`, adds a bias to a
  layer's attention logits (broadcastable to [batch, heads, queries, keys]); an Attention-Gate
  mask is such a bias (0 where kept, -inf or log p where evicted).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded: malformed file, missing or extra tensor, wrong shape."""


@dataclass
class LlamaConfig:
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> "LlamaConfig":
        archs = d.get("architectures") or []
        if "LlamaForCausalLM" not in archs and d.get("model_type") != "llama":
            raise WeightsError(f"{source}: not a Llama checkpoint (architectures={archs}, "
                               f"model_type={d.get('model_type')!r})")
        if d.get("rope_scaling"):
            raise WeightsError(f"{source}: rope_scaling {d['rope_scaling']!r} is not supported")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise WeightsError(f"{source}: {flag}=true is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise WeightsError(f"{source}: hidden_act {d['hidden_act']!r} is not supported")
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            eos = d.get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(d.get("rope_theta", 10000.0)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos,
                initializer_range=float(d.get("initializer_range", 0.02)),
            )
        except KeyError as e:
            raise WeightsError(f"{source}: missing field {e.args[0]!r}") from None
        except ValueError as e:
            raise WeightsError(f"{source}: {e}") from None

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": None,
            "initializer_range": self.initializer_range,
            "use_cache": True,
            "torch_dtype": torch_dtype,
        }

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the Hugging Face layout, by name, with its shape."""
        h, d = self.hidden_size, self.head_dim
        q_out, kv_out = self.num_attention_heads * d, self.num_key_value_heads * d
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv_out, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv_out, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
            shapes[p + "mlp.gate_proj.weight"] = (self.intermediate_size, h)
            shapes[p + "mlp.up_proj.weight"] = (self.intermediate_size, h)
            shapes[p + "mlp.down_proj.weight"] = (h, self.intermediate_size)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.expected_shapes().values())


# ------------------------------------------------------------------------------------ modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [..., T, head_dim] for integer `positions` [..., T] (HF layout),
    computed in float64 then cast to `dtype`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64,
                                             device=positions.device) / head_dim))
    freqs = positions.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d]; cos/sin [T, d] or [B, T, d]."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


@dataclass
class Capture:
    """What `LlamaForCausalLM.forward` keeps per layer (in `layers`, one dict per layer).

    normed_input: [B, T, hidden], the input of self-attention after input_layernorm.
    qkv: "q" [B, T, h, d], "k"/"v" [B, T, n_kv, d], pre-RoPE projections of the new tokens.
    logits: "logits" [B, h, T, S], pre-softmax attention logits (QK^T/sqrt(d) + bias, causal
      positions -inf) over the S = past + T keys. Materializes the attention matrix.
    detach: detach the captured tensors (default) or keep them in the graph.
    """
    normed_input: bool = False
    qkv: bool = False
    logits: bool = False
    detach: bool = True
    layers: list = field(default_factory=list)


@dataclass
class ProbMask:
    """Returned by an `attn_bias` function instead of an additive bias: multiplies the attention
    probabilities [B, h, T, S] by `mask` (broadcastable; 0 hides a key, 1 keeps it; a soft value
    carries gradient, e.g. a straight-through flag) and renormalizes each row."""
    mask: torch.Tensor


AttnBiasFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                      Optional[torch.Tensor]]


class KVCache:
    """Per-layer keys (post-RoPE) and values, [B, n_kv, S, d], for incremental decoding."""

    def __init__(self, num_layers: int):
        self.k: list[Optional[torch.Tensor]] = [None] * num_layers
        self.v: list[Optional[torch.Tensor]] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_idx: int,
                cache: Optional[KVCache], capture: Optional[Capture],
                attn_bias: Optional[AttnBiasFn]) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        rec = capture.layers[layer_idx] if capture is not None else None
        if rec is not None and capture.qkv:
            keep = (lambda t: t.detach()) if capture.detach else (lambda t: t)
            rec.update(q=keep(q), k=keep(k), v=keep(v))
        bias = attn_bias(layer_idx, x, q, k, v) if attn_bias is not None else None

        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        past = 0
        if cache is not None:
            past = 0 if cache.k[layer_idx] is None else cache.k[layer_idx].shape[2]
            k, v = cache.update(layer_idx, k, v)
        S = k.shape[2]
        group = self.n_heads // self.n_kv
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)

        want_logits = rec is not None and capture.logits
        if bias is None and not want_logits:
            # Fused kernel; causal over the new tokens, all past keys visible.
            if past == 0:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            else:
                mask = _causal_mask(T, S, past, q.device)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            logits = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            logits = logits.float()
            prob_mask = bias.mask if isinstance(bias, ProbMask) else None
            if bias is not None and prob_mask is None:
                logits = logits + bias.float()
            logits = logits.masked_fill(~_causal_mask(T, S, past, q.device), float("-inf"))
            if want_logits:
                rec["logits"] = logits.detach() if capture.detach else logits
            probs = torch.softmax(logits, dim=-1)
            if prob_mask is not None:
                probs = probs * prob_mask.float()
                probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-30)
            out = probs.to(v.dtype) @ v
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out)


def _causal_mask(T: int, S: int, past: int, device) -> torch.Tensor:
    """[T, S] boolean, True where query i (at position past+i) may see key j."""
    qpos = torch.arange(T, device=device)[:, None] + past
    kpos = torch.arange(S, device=device)[None, :]
    return kpos <= qpos


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.dropout = 0.0  # residual dropout, training only (set by set_dropout)

    def forward(self, x, cos, sin, layer_idx, cache, capture, attn_bias):
        h = self.input_layernorm(x)
        if capture is not None and capture.normed_input:
            capture.layers[layer_idx]["normed_input"] = h.detach() if capture.detach else h
        a = self.self_attn(h, cos, sin, layer_idx, cache, capture, attn_bias)
        x = x + (F.dropout(a, self.dropout, True) if self.training and self.dropout else a)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (F.dropout(m, self.dropout, True) if self.training and self.dropout else m)


class LlamaBody(nn.Module):
    """The `model.` prefix of the Hugging Face names."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False

    def init_weights(self, seed: Optional[int] = None) -> None:
        """Normal(0, initializer_range) weights, ones for norms; output projections scaled by
        1/sqrt(2 * layers) (GPT-2 style) so deep residual streams start stable."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.fill_(1.0)
                else:
                    s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    def set_dropout(self, p: float) -> None:
        """Residual dropout on every attention and MLP output while training (0 disables)."""
        for layer in self.model.layers:
            layer.dropout = float(p)

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                      cache: Optional[KVCache] = None, capture: Optional[Capture] = None,
                      attn_bias: Optional[AttnBiasFn] = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] of `input_ids` [B, T]."""
        B, T = input_ids.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta,
                                torch.float32)
        if capture is not None:
            capture.layers = [{} for _ in self.model.layers]
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, i, None, capture, attn_bias, use_reentrant=False)
            else:
                x = layer(x, cos, sin, i, cache, capture, attn_bias)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, capture: Optional[Capture] = None,
                attn_bias: Optional[AttnBiasFn] = None) -> torch.Tensor:
        """Logits [B, T, vocab] (float32)."""
        h = self.hidden_states(input_ids, positions, cache, capture, attn_bias)
        return F.linear(h, self.output_weight()).float()

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor,
             weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean next-token cross entropy; `targets` -100 are ignored; optional per-token weights."""
        logits = self.forward(input_ids)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=-100, reduction="none")
        valid = (targets.reshape(-1) != -100).float()
        w = valid if weights is None else valid * weights.reshape(-1).float()
        return (ce * w).sum() / w.sum().clamp_min(1e-9)

    @torch.no_grad()
    def generate_greedy(self, prompt_ids: list[int], max_new_tokens: int,
                        stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy decoding with a KV cache; returns the new ids (stops after a stop id)."""
        device = self.model.embed_tokens.weight.device
        cache = KVCache(self.config.num_hidden_layers)
        logits = self.forward(torch.tensor([prompt_ids], device=device), cache=cache)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stop_ids:
                break
            logits = self.forward(torch.tensor([[nxt]], device=device), cache=cache)
        return out

    # ------------------------------------------------------------------------ HF layout I/O

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under their Hugging Face names (no lm_head when tied)."""
        return dict(self.state_dict())

    def save_pretrained(self, out_dir: str, dtype: torch.dtype = torch.float32) -> None:
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        dtype_name = str(dtype).replace("torch.", "")
        with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
            json.dump(self.config.to_hf_dict(dtype_name), f, indent=2)
            f.write("\n")
        tensors = {k: v.detach().to("cpu", dtype).contiguous()
                   for k, v in self.hf_state_dict().items()}
        path = os.path.join(out_dir, WEIGHTS_FILE)
        save_file(tensors, path, metadata={"format": "pt"})
        os.chmod(path, 0o644)

    @classmethod
    def from_pretrained(cls, model_dir: str, dtype: torch.dtype = torch.float32,
                        device: str = "cpu") -> "LlamaForCausalLM":
        cfg = load_config(model_dir)
        tensors = load_weights(os.path.join(model_dir, WEIGHTS_FILE), cfg)
        model = cls(cfg)
        model.load_state_dict(tensors)
        return model.to(device=device, dtype=dtype)


def load_config(model_dir: str) -> LlamaConfig:
    path = os.path.join(model_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{path}: not found (is {model_dir!r} a Hugging Face model "
                           "directory?)") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: malformed JSON ({e})") from None
    return LlamaConfig.from_hf_dict(d, source=path)


def load_weights(path: str, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Reads a safetensors file and checks it holds exactly the tensors of `cfg`, with their
    shapes, in a floating dtype. Raises WeightsError naming the file and the first problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise WeightsError(f"{path}: not found")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file "
                           f"(truncated or corrupt?): {e}") from None
    expected = cfg.expected_shapes()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if cfg.tie_word_embeddings and unexpected == ["lm_head.weight"]:
        # Some exporters write the tied head anyway; accept it only if it is the embedding.
        if torch.equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
            tensors.pop("lm_head.weight")
            unexpected = []
    if missing:
        raise WeightsError(f"{path}: missing {len(missing)} tensor(s) the config needs, e.g. "
                           f"{missing[:3]}")
    if unexpected:
        raise WeightsError(f"{path}: {len(unexpected)} tensor(s) the config does not have, e.g. "
                           f"{unexpected[:3]}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise WeightsError(f"{path}: tensor {name} has shape {list(t.shape)}, but the "
                               f"config needs {list(shape)}")
        if not t.dtype.is_floating_point:
            raise WeightsError(f"{path}: tensor {name} has dtype {t.dtype}, expected a float")
        if not torch.isfinite(t).all():
            raise WeightsError(f"{path}: tensor {name} holds NaN or Inf")
    return tensors
