"""Attention-Gate gates for a frozen (optionally LoRA-tuned) Llama-family model.

Gate per layer (../shared/design/EVICTION.md, EVICTION-REFERENCE.md section 2, reconstructed):
a reduced causal multi-head attention over the layer's normalized input (`--gate-heads` heads of
`--gate-head-dim`, no positional encoding), projected to one logit per KV head; p = sigmoid,
flag = p > tau; the first token is never evicted. A token flagged 0 in a head is invisible to
later queries of that head; a token always attends to itself.

Training: straight-through flags f_ste = f + p - stopgrad(p) multiply the attention
probabilities (then renormalized), so the forward pass is exactly the hard-masked model and the
gradient reaches p. Loss = LM cross entropy (`--lm-loss all|answer`) + lambda * eviction loss,
where r_l is the mean kept fraction of layer l (`--ratio-of p|flags`, tokens after the first)
and the eviction loss (`--evict-loss`) is
- squared (default): mean_l (r_l - (1 - target))^2
- abs:               mean_l |r_l - (1 - target)|
- linear:            mean_l (r_l - (1 - target))   (the paper's v1 form as the reviewers read it)
- lagrangian: sum_l lambda_l (r_l - (1 - target)) / L with one multiplier per layer (of either
  sign: the constraint is an equality), moved after every step by --lam-lr times how far that
  layer's measured kept fraction (hard flags, smoothed) is from the target (dual ascent), plus a
  proportional term (--lam-p times the error) that damps overshoot. A fixed lambda undershoots
  (the shipped squared-loss gates evicted 17% against a 0.5 target) or, large, overshoots; the
  multipliers move until the measured ratio meets the target.
- threshold: no eviction loss. Every step each layer's keep threshold is set to the quantile of
  its gate logits (over the batch, tokens after the first, all KV heads) that evicts exactly the
  target, so the flags meet the target from the first step and the LM loss only decides which
  tokens rank above it; the threshold's running mean (--thr-smooth) is folded into the
  exported bias. Eviction losses move the flags through the threshold all at once: a fixed
  lambda undershot (squared, 0.5 target: 0.17 evicted) or swung (lr 1e-3: kept 0.11 to 0.96),
  the multipliers overshoot (docs/eval.md, "Attention-Gate gates"); this form has nothing to
  tune and is the default.
`--train-budget B1,B2,...` trains the scores for the budgeted cache instead (each step draws a
budget): a query sees the flagged tokens of its own prefill chunk (`--train-chunk`) and, of the
earlier chunks, the B flagged tokens of highest p per KV head, exactly what kvgate's
attention-gate cache holds for fixed scores (budget_prob_mask); the straight-through term
carries the LM loss to the scores of evicted tokens too, so the tokens a later answer needed
(the needle) learn to rank in the top B. This is how the shipped gates are trained.
Trainable (`--train`): the gates only (default), or gates plus LoRA adapters (`--lora-rank`) on
the backbone's attention projections; with LoRA the merged backbone is exported too
(`--merged-model-out`).

Export: safetensors with `model.layers.{i}.attention_gate.{q,k,v,o}_proj.weight`, the gate's
output bias `model.layers.{i}.attention_gate.o_proj.bias` [n_kv] (our extension), and metadata
`kvgate.kind = attention-gate`, `kvgate.heads`, `kvgate.head_dim`, `kvgate.tau`.

    PYTHONPATH=training python3 -m kvgate_train.gates --model models/kvgate-default \\
        --out models/kvgate-default/attention_gate.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import NaturalTextError
from .features import DATA_SOURCES, FILLER_HELP, load_frozen
from .locret import fill_from, read_safetensors
from .model import LlamaConfig, LlamaForCausalLM, ProbMask, WeightsError

KIND = "attention-gate"
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


class AttentionGate(nn.Module):
    def __init__(self, hidden: int, n_kv: int, heads: int = 4, head_dim: int = 64):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        # The bias (an extension of EVICTION.md's format: `o_proj.bias` [n_kv]) lets a gate
        # shift all its flags at once; without it a layer whose input has no common direction
        # (e.g. the first, over embeddings) cannot move its keep ratio.
        self.o_proj = nn.Linear(heads * head_dim, n_kv, bias=True)

    def project(self, x: torch.Tensor):
        """x [B, T, D] -> q, k, v [B, H, T, d_ag]."""
        B, T, _ = x.shape
        f = lambda lin: lin(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        return f(self.q_proj), f(self.k_proj), f(self.v_proj)

    def logits(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               past: int = 0) -> torch.Tensor:
        """q [B, H, T, d_ag] of the new tokens, k/v [B, H, past + T, d_ag] -> [B, T, n_kv]."""
        T = q.shape[2]
        if past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            S = k.shape[2]
            mask = (torch.arange(S, device=q.device)[None, :]
                    <= torch.arange(T, device=q.device)[:, None] + past)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        B = q.shape[0]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] (the layer's normalized input) -> gate logits [B, T, n_kv]."""
        return self.logits(*self.project(x))


class Gates(nn.Module):
    def __init__(self, cfg: LlamaConfig, heads: int = 4, head_dim: int = 64, tau: float = 0.5,
                 bias_init: float = 2.0):
        """bias_init: initial o_proj bias; 2.0 starts every p near 0.88 (keep everything), so
        training starts from the full-cache model."""
        super().__init__()
        self.cfg, self.heads, self.head_dim, self.tau = cfg, heads, head_dim, tau
        self.layers = nn.ModuleList(
            AttentionGate(cfg.hidden_size, cfg.num_key_value_heads, heads, head_dim)
            for _ in range(cfg.num_hidden_layers))
        with torch.no_grad():
            for g in self.layers:
                g.o_proj.bias.fill_(bias_init)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, g in enumerate(self.layers):
            for p in PROJ:
                out[f"model.layers.{i}.attention_gate.{p}.weight"] = getattr(g, p).weight
            out[f"model.layers.{i}.attention_gate.o_proj.bias"] = g.o_proj.bias
        return out


def hard_flags(p: torch.Tensor, tau: float) -> torch.Tensor:
    """p [B, T, n_kv] -> 0/1 flags (float), the first token always kept."""
    f = (p > tau).float()
    f[:, 0, :] = 1.0
    return f


def flag_prob_mask(f: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Flags [B, T, n_kv] (hard or straight-through) -> probability mask [B, h, T, T]: key j
    visible to query i of head h iff f[j, kv(h)] (and always to itself)."""
    B, T, n_kv = f.shape
    m = f.permute(0, 2, 1)[:, :, None, :].repeat_interleave(n_heads // n_kv, dim=1)
    m = m.expand(B, n_heads, T, T)
    eye = torch.eye(T, dtype=torch.bool, device=f.device)
    return torch.where(eye, torch.ones((), dtype=m.dtype, device=m.device), m)


def budget_prob_mask(p: torch.Tensor, f: torch.Tensor, budget: int, chunk: int,
                     n_heads: int) -> torch.Tensor:
    """The mask of kvgate's budgeted Attention-Gate cache under chunked prefill, for fixed
    scores: p, f [B, T, n_kv] (probabilities, hard flags) -> [B, h, T, T]. A query of chunk c
    sees the flagged tokens of its own chunk (up to itself) and, of the earlier chunks, the
    `budget` flagged tokens of highest p per KV head (the first token always among them): what
    the cache holds after compressing at the end of chunk c - 1. Straight-through: the hard
    mask plus p - stopgrad(p) of each key, so the LM loss reaches the scores of the tokens it
    needed whether they were kept or not."""
    B, T, n_kv = p.shape
    pd = p.detach().permute(0, 2, 1).clone()          # [B, n_kv, T]
    fd = f.detach().permute(0, 2, 1) > 0.5            # [B, n_kv, T]
    fd[..., 0] = True                                 # the first token is never evicted
    pd[..., 0] = float("inf")                         # and is kept first
    # ahead[b, k, l, j]: flagged token l outranks token j (ties: the later token wins).
    idx = torch.arange(T, device=p.device)
    ahead = (pd[..., :, None] > pd[..., None, :]) | (
        (pd[..., :, None] == pd[..., None, :]) & (idx[:, None] > idx[None, :]))
    ahead &= fd[..., :, None]
    before = ahead.to(torch.int32).cumsum(dim=2)      # [.., s, j]: outranking tokens in [0, s]
    start = (idx // chunk) * chunk                    # each query's chunk start
    rank = before.index_select(2, (start - 1).clamp_min(0))  # [B, n_kv, T(i), T(j)]
    earlier = idx[None, :] < start[:, None]           # [T(i), T(j)]
    own = (idx[None, :] >= start[:, None]) & (idx[None, :] <= idx[:, None])
    hard = fd[..., None, :] & (own | (earlier & (rank < budget)))
    soft = hard.to(p.dtype) + (p - p.detach()).permute(0, 2, 1)[..., None, :]
    m = soft.repeat_interleave(n_heads // n_kv, dim=1)
    eye = torch.eye(T, dtype=torch.bool, device=p.device)
    return torch.where(eye, torch.ones((), dtype=m.dtype, device=m.device), m)


class GateRun:
    """The attn_bias hook applying a Gates module; records p and flags per layer.

    evict: with a target eviction ratio, each layer's logits are shifted by the quantile that
    evicts exactly that share of the batch's tokens (after the first) before the threshold
    (`--evict-loss threshold`); the shifts are recorded in `thr`."""

    def __init__(self, gates: Gates, straight_through: bool, evict: Optional[float] = None,
                 budget: int = 0, chunk: int = 128):
        self.gates, self.ste, self.evict = gates, straight_through, evict
        self.budget, self.chunk = budget, chunk
        self.p: list[Optional[torch.Tensor]] = [None] * len(gates.layers)
        self.f: list[Optional[torch.Tensor]] = [None] * len(gates.layers)
        self.thr: list[float] = [0.0] * len(gates.layers)
        self.scale: list[float] = [1.0] * len(gates.layers)

    def __call__(self, layer: int, x: torch.Tensor, q, k, v):
        z = self.gates.layers[layer](x).float()
        if self.evict is not None:
            # z > quantile keeps 1 - evict of the tokens; logit(tau) puts that at p = tau. The
            # logits are divided by their spread, so that p does not saturate as the LM loss
            # pushes every logit up (the quantile follows; only the ranking matters).
            tau = self.gates.tau
            zd = z.detach()[:, 1:].reshape(-1)
            thr = float(torch.quantile(zd, self.evict))
            scale = max(float(zd.std()), 1e-6)
            self.thr[layer], self.scale[layer] = thr, scale
            z = (z - thr) / scale + math.log(tau / (1 - tau))
        p = torch.sigmoid(z)
        f = hard_flags(p.detach(), self.gates.tau)
        if self.ste:
            f = f + p - p.detach()
        self.p[layer], self.f[layer] = p, f
        if self.budget > 0:
            return ProbMask(budget_prob_mask(p, f, self.budget, self.chunk,
                                             self.gates.cfg.num_attention_heads))
        return ProbMask(flag_prob_mask(f, self.gates.cfg.num_attention_heads))


@torch.no_grad()
def fold_threshold(gates: Gates, thr: list[float], scale: list[float]) -> None:
    """Writes each layer's threshold and spread (`--evict-loss threshold`) into its output
    projection, so that the exported gate alone flags z > thr, with p = sigmoid((z - thr) /
    scale + logit(tau)) as in training."""
    logit_tau = math.log(gates.tau / (1 - gates.tau))
    for g, t, sc in zip(gates.layers, thr, scale):
        g.o_proj.bias.sub_(t).div_(sc).add_(logit_tau)
        g.o_proj.weight.div_(sc)


def metadata(gates: Gates, extra: Optional[dict] = None) -> dict[str, str]:
    cfg = gates.cfg
    md = {"kvgate.kind": KIND, "kvgate.heads": str(gates.heads),
          "kvgate.head_dim": str(gates.head_dim), "kvgate.tau": repr(float(gates.tau)),
          "kvgate.num_layers": str(cfg.num_hidden_layers),
          "kvgate.hidden_size": str(cfg.hidden_size),
          "kvgate.num_key_value_heads": str(cfg.num_key_value_heads)}
    md.update(extra or {})
    return md


def save_gates(gates: Gates, path: str, extra: Optional[dict] = None) -> None:
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in gates.tensors().items()}, path, metadata=metadata(gates, extra))
    os.chmod(path, 0o644)


def load_gates(path: str, cfg: LlamaConfig, tau: Optional[float] = None) -> Gates:
    tensors, md = read_safetensors(path)
    kind = md.get("kvgate.kind")
    if kind != KIND:
        raise WeightsError(f"{path}: kvgate.kind is {kind!r}, expected {KIND!r}")
    try:
        heads, head_dim = int(md["kvgate.heads"]), int(md["kvgate.head_dim"])
        file_tau = float(md.get("kvgate.tau", "0.5"))
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{path}: bad or missing metadata ({e})") from None
    n_layers = sum(1 for k in tensors if k.endswith("attention_gate.q_proj.weight"))
    if n_layers != cfg.num_hidden_layers:
        raise WeightsError(f"{path}: has gates for {n_layers} layers, the model has "
                           f"{cfg.num_hidden_layers}: made for another model")
    gates = Gates(cfg, heads, head_dim, file_tau if tau is None else tau)
    fill_from(gates.tensors(), tensors, path)
    return gates


# --------------------------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a), self.b) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * self.b @ self.a


def add_lora(model: LlamaForCausalLM, rank: int, alpha: float) -> list[nn.Parameter]:
    params = []
    for layer in model.model.layers:
        for name in PROJ:
            lora = LoRALinear(getattr(layer.self_attn, name), rank, alpha)
            setattr(layer.self_attn, name, lora)
            params += [lora.a, lora.b]
    return params


def merge_lora(model: LlamaForCausalLM) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            for name in PROJ:
                m = getattr(layer.self_attn, name)
                if isinstance(m, LoRALinear):
                    m.base.weight.copy_(m.merged_weight())
                    setattr(layer.self_attn, name, m.base)


# ----------------------------------------------------------------------------- training


class Multipliers:
    """Lagrange multipliers of the per-layer constraints kept fraction = keep_target, updated by
    dual ascent on the measured (hard-flag) kept fractions, smoothed over recent steps."""

    def __init__(self, layers: int, keep_target: float, lr: float, p_gain: float = 0.0,
                 limit: float = 100.0, smooth: float = 0.9):
        self.integral = [0.0] * layers
        self.lam = [0.0] * layers
        self.kept = [1.0] * layers
        self.keep_target, self.lr, self.p_gain = keep_target, lr, p_gain
        self.limit, self.smooth = limit, smooth

    def penalty(self, r: torch.Tensor) -> torch.Tensor:
        """r [L] soft kept fractions -> sum_l lambda_l (r_l - target) / L."""
        lam = torch.tensor(self.lam, dtype=r.dtype, device=r.device)
        return (lam * (r - self.keep_target)).mean()

    def update(self, kept: list[float]) -> None:
        for l, k in enumerate(kept):
            self.kept[l] = self.smooth * self.kept[l] + (1 - self.smooth) * k
            err = self.kept[l] - self.keep_target
            self.integral[l] = max(-self.limit, min(self.limit, self.integral[l] + self.lr * err))
            self.lam[l] = self.integral[l] + self.p_gain * err


def evict_loss(r: torch.Tensor, keep_target: float, form: str) -> torch.Tensor:
    """r [L] kept fractions -> scalar."""
    d = r - keep_target
    if form == "squared":
        return (d * d).mean()
    if form == "abs":
        return d.abs().mean()
    if form == "linear":
        return d.mean()
    raise ValueError(f"unknown eviction loss {form!r}")


def batch_tensors(seqs, device):
    """Pads to the longest: inputs, targets (-100 pad), answer mask (targets in the answer)."""
    T = max(len(s.ids) for s in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    am = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s.ids) - 1
        x[i, :n] = torch.tensor(s.ids[:-1])
        y[i, :n] = torch.tensor(s.ids[1:])
        am[i, s.n_prompt - 1:n] = True
    return x.to(device), y.to(device), am.to(device)


def nll(model, x, y, weights=None, attn_bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token NLL, token count) over targets != -100 (and weights)."""
    logits = model(x, attn_bias=attn_bias)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                         ignore_index=-100, reduction="none")
    w = (y.reshape(-1) != -100).float()
    if weights is not None:
        w = w * weights.reshape(-1).float()
    return (ce * w).sum(), w.sum()


def nll_parts(model, x, y, answer_mask, attn_bias=None):
    """One forward pass -> ((NLL sum, count) over all targets, (NLL sum, count) over the
    answer's targets)."""
    logits = model(x, attn_bias=attn_bias)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                         ignore_index=-100, reduction="none")
    w = (y.reshape(-1) != -100).float()
    wa = w * answer_mask.reshape(-1).float()
    return ((ce * w).sum(), w.sum()), ((ce * wa).sum(), wa.sum())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m kvgate_train.gates",
        description="Train Attention-Gate gates (per layer, per KV head keep flags) for a frozen "
                    "Hugging Face Llama-family model with a straight-through estimator and an "
                    "eviction loss toward a target ratio; report the measured eviction ratio and "
                    "held-out NLL against the full cache; export in kvgate's format.")
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--out", required=True, help="gates safetensors file to write")
    ap.add_argument("--data", choices=DATA_SOURCES, default="tasks")
    ap.add_argument("--text-file")
    ap.add_argument("--filler-sources", default="kjv", help=FILLER_HELP)
    ap.add_argument("--decoys", type=int, default=0,
                    help="decoy sentences with other numbers in each passkey sample")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tail", type=int, default=32, help="answer length of text/sampled data")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-samples", type=int, default=2000)
    ap.add_argument("--heldout-samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--gate-heads", type=int, default=4)
    ap.add_argument("--gate-head-dim", type=int, default=64)
    ap.add_argument("--tau", type=float, default=0.5, help="keep threshold on sigmoid(logit)")
    ap.add_argument("--bias-init", type=float, default=2.0,
                    help="initial gate output bias (2.0: start keeping every token)")
    ap.add_argument("--target", type=float, default=0.5, help="target eviction ratio")
    ap.add_argument("--lam", type=float, default=4.0,
                    help="weight of the eviction loss (lagrangian: the multipliers' start, 0)")
    ap.add_argument("--evict-loss",
                    choices=("threshold", "squared", "abs", "linear", "lagrangian"),
                    default="threshold", help="how the target is met (module docstring)")
    ap.add_argument("--thr-smooth", type=float, default=0.9,
                    help="threshold: weight of the old value in the threshold's running mean")
    ap.add_argument("--lam-lr", type=float, default=0.2,
                    help="lagrangian: the multipliers' step per unit of kept-fraction error")
    ap.add_argument("--lam-p", type=float, default=5.0,
                    help="lagrangian: the multipliers' proportional gain")
    ap.add_argument("--ratio-of", choices=("p", "flags"), default="p",
                    help="r_l from the probabilities or from the straight-through flags")
    ap.add_argument("--lm-loss", choices=("all", "answer"), default="all",
                    help="cross entropy over all tokens (CPT) or answer tokens (SFT)")
    ap.add_argument("--answer-weight", type=float, default=2.0,
                    help="with --lm-loss all: plus this times the mean loss on answer tokens "
                         "(as the default model was trained)")
    ap.add_argument("--target-warmup", type=float, default=0.5,
                    help="threshold: the share of the steps over which the evicted share rises "
                         "linearly from 0 to --target (random gates at the full target would "
                         "hide half of every context from the first step)")
    ap.add_argument("--train-budget", default="",
                    help="comma-separated budgets (tokens per KV head): each step draws one and "
                         "trains under the mask of kvgate's budgeted cache (budget_prob_mask), so "
                         "the scores learn which tokens to keep at that budget; '' (default): "
                         "the flags alone, as the paper")
    ap.add_argument("--train-chunk", type=int, default=128,
                    help="with --train-budget: the prefill chunk the mask assumes")
    ap.add_argument("--train", choices=("gates", "gates+lora"), default="gates")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--merged-model-out", help="with --train gates+lora: write the merged "
                    "backbone (a Hugging Face directory) here")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float,
                    help="AdamW weight decay (default 0.1 with --evict-loss threshold, else 0)")
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--report", help="metrics JSON (default: OUT with .json)")
    return ap


@torch.no_grad()
def evaluate(model, gates, seqs, batch, device, tau):
    """Held-out mean NLL with the full cache and with the gates (hard flags), and the measured
    eviction ratio (1 - kept / (tokens * KV heads * layers)), overall and per layer."""
    full_sum = gated_sum = count = 0.0
    kept = torch.zeros(len(gates.layers))
    total = 0.0
    for i in range(0, len(seqs), batch):
        x, y, _ = batch_tensors(seqs[i:i + batch], device)
        s, n = nll(model, x, y)
        run = GateRun(gates, straight_through=False)
        g, _ = nll(model, x, y, attn_bias=run)
        full_sum += float(s)
        gated_sum += float(g)
        count += float(n)
        valid = (x != 0) | (torch.arange(x.shape[1], device=device) == 0)  # padding is id 0? no
        for layer, f in enumerate(run.f):
            kept[layer] += float(f.sum())
        total += x.shape[0] * x.shape[1] * gates.cfg.num_key_value_heads
    ratio_per_layer = (1 - kept / total).tolist()
    return {"nll_full": full_sum / count, "nll_gated": gated_sum / count,
            "eviction_ratio": 1 - float(kept.sum()) / (total * len(gates.layers)),
            "eviction_ratio_per_layer": [round(r, 4) for r in ratio_per_layer]}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    if not 0.0 <= args.target < 1.0:
        print("error: --target must be in [0, 1)", file=sys.stderr)
        return 1
    try:
        model, device, train_src, held_src = load_frozen(args)
        seq_len = train_src.seq_len
    except (WeightsError, ValueError, NaturalTextError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = model.config
    t = time.time()
    held = [held_src.get(i) for i in range(args.heldout_samples)]
    print(f"held-out: {len(held)} sequences of up to {seq_len} tokens ({time.time() - t:.0f} s)",
          flush=True)
    torch.manual_seed(args.seed)
    gates = Gates(cfg, args.gate_heads, args.gate_head_dim, args.tau, args.bias_init).to(device)
    params = list(gates.parameters())
    if args.train == "gates+lora":
        params += add_lora(model, args.lora_rank, args.lora_alpha)
    # threshold: the loss does not see the logits' scale, so weight decay keeps it bounded.
    wd = args.weight_decay if args.weight_decay is not None else (
        0.1 if args.evict_loss == "threshold" else 0.0)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=wd)
    n_gate = sum(p.numel() for p in gates.parameters())
    print(f"gates: {args.gate_heads} heads x {args.gate_head_dim}, {n_gate / 1e6:.3f}M "
          f"parameters; training {args.train}; target eviction {args.target}, lambda {args.lam}, "
          f"{args.evict_loss} loss on r from {args.ratio_of}", flush=True)
    before = evaluate(model, gates, held, args.batch, device, args.tau)
    print(f"before: {json.dumps(before)}", flush=True)
    keep_target = 1.0 - args.target
    duals = (Multipliers(len(gates.layers), keep_target, args.lam_lr, args.lam_p)
             if args.evict_loss == "lagrangian" else None)
    train_budgets = [int(b) for b in args.train_budget.split(",") if b] \
        if args.train_budget else []
    budget_rng = random.Random(args.seed)
    history = []  # per log line: step, the kept fraction (flags) and the multipliers
    thr_mean = [0.0] * len(gates.layers)  # threshold: running mean of each layer's quantile
    scale_mean = [1.0] * len(gates.layers)  # and of its logits' spread
    cache: dict[int, object] = {}
    model.train()
    run_lm = run_ev = run_keep = 0.0
    n_run = 0
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        lr *= 0.5 * (1 + math.cos(math.pi * step / args.steps)) if step >= args.warmup_steps \
            else 1.0
        for g in opt.param_groups:
            g["lr"] = lr
        idx = [(step * args.batch + j) % args.train_samples for j in range(args.batch)]
        seqs = []
        for i in idx:
            if i not in cache:
                cache[i] = train_src.get(i)
            seqs.append(cache[i])
        x, y, am = batch_tensors(seqs, device)
        ramp = min(1.0, (step + 1) / max(1.0, args.target_warmup * args.steps))
        run = GateRun(gates, straight_through=True,
                      evict=args.target * ramp if args.evict_loss == "threshold" else None,
                      budget=budget_rng.choice(train_budgets) if train_budgets else 0,
                      chunk=args.train_chunk)
        (s, n), (sa, na) = nll_parts(model, x, y, am, attn_bias=run)
        if args.lm_loss == "answer":
            lm = sa / na.clamp_min(1)
        else:  # the answer tokens alone say "this far-back token was needed" (the needle)
            lm = s / n.clamp_min(1) + args.answer_weight * sa / na.clamp_min(1)
        src = run.p if args.ratio_of == "p" else run.f
        r = torch.stack([t[:, 1:].mean() for t in src])
        if args.evict_loss == "threshold":
            a = 0.0 if step == 0 else args.thr_smooth
            for l in range(len(run.thr)):
                thr_mean[l] = a * thr_mean[l] + (1 - a) * run.thr[l]
                scale_mean[l] = a * scale_mean[l] + (1 - a) * run.scale[l]
            ev = torch.zeros((), device=lm.device)
            loss = lm
        elif duals is not None:
            ev = duals.penalty(r)
            loss = lm + ev
        else:
            ev = evict_loss(r, keep_target, args.evict_loss)
            loss = lm + args.lam * ev
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run_lm += float(lm.detach())
        run_ev += float(ev.detach())
        kept_now = [float(f.detach()[:, 1:].mean()) for f in run.f]
        if duals is not None:
            duals.update(kept_now)
        run_keep += sum(kept_now) / len(kept_now)
        n_run += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            lam_text = (" | lambda " + " ".join(f"{x:.2f}" for x in duals.lam)
                        if duals is not None else "")
            if args.evict_loss == "threshold":
                lam_text = " | threshold / spread " + " ".join(
                    f"{x:.2f}/{y:.2f}" for x, y in zip(thr_mean, scale_mean))
            print(f"step {step + 1:5d}/{args.steps} | lm {run_lm / n_run:.4f} | evict loss "
                  f"{run_ev / n_run:.4f} | kept (flags) {run_keep / n_run:.3f}{lam_text} | "
                  f"lr {lr:.2e} | {time.time() - t0:.0f} s", flush=True)
            history.append({"step": step + 1, "kept": round(run_keep / n_run, 4),
                            "lambda": [round(x, 3) for x in duals.lam] if duals else None,
                            "threshold": ([round(x, 3) for x in thr_mean]
                                          if args.evict_loss == "threshold" else None)})
            run_lm = run_ev = run_keep = 0.0
            n_run = 0
    model.eval()
    if args.evict_loss == "threshold":
        fold_threshold(gates, thr_mean, scale_mean)
    after = evaluate(model, gates, held, args.batch, device, args.tau)
    print(f"after: {json.dumps(after)}", flush=True)
    extra = {"kvgate.model": os.path.basename(os.path.normpath(args.model)),
             "kvgate.trained": json.dumps({"data": args.data, "seq_len": seq_len,
                                           "steps": args.steps, "target": args.target,
                                           "evict_loss": args.evict_loss,
                                           "train": args.train})}
    save_gates(gates, args.out, extra)
    if args.train == "gates+lora":
        merge_lora(model)
        if args.merged_model_out:
            model.save_pretrained(args.merged_model_out)
            for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                         "tokenizer.model"):
                src = os.path.join(args.model, name)
                if os.path.exists(src):
                    shutil.copy(src, os.path.join(args.merged_model_out, name))
    report = {"model": args.model, "out": args.out, "args": vars(args), "before": before,
              "after": after, "history": history, "seconds": round(time.time() - t0, 1)}
    rpath = args.report or os.path.splitext(args.out)[0] + ".json"
    with open(rpath, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out} and {rpath} ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
