"""PyTorch reference of inference with eviction, for Locret and Attention-Gate (batch 1).

Written for clarity, not speed: per layer and per KV head, a ragged list of retained tokens
(pre-RoPE key, value, score, original position). kvgate's C++ cache is checked against the dump
of this module (`--out FILE.json`).

Locret (EVICTION-REFERENCE.md 1.4, EVICTION.md):
- the prompt except its last `n_loc` tokens is prefilled in chunks of `chunk`; each chunk attends
  to the retained cache plus itself (causally); each new token's retaining-head score is computed
  once, when its chunk runs, and stored;
- after each of these chunks, per (layer, KV head): keep the `budget` tokens of highest stored
  score, the `stabilizers` most recent tokens counting as +inf except after the last chunk;
  ties go to the more recent token; the kept tokens stay in position order;
- the last `n_loc` tokens are then prefilled (same chunking) and never evicted at prefill;
- decode: each new token is appended with its score; when a head holds `budget + slack` tokens it
  is cut to `budget` with the same rule (the `stabilizers` most recent protected).
Attention-Gate:
- each chunk's tokens get flags from the layer's gate (the gate's own causal attention sees every
  earlier token of the sequence); a token flagged 0 in a head is invisible to later queries of
  that head and is not stored; a token always attends to itself; the first token is always kept;
- with a budget, a head holding more than `budget` tokens after a chunk (or `budget + slack`
  during decode) keeps the `budget` of highest gate probability, the first token first.
Positions: `reassign` (keys rotated at contiguous positions 0..n-1 over the retained tokens, the
new tokens after them) or `original` (each key at its original position).

    PYTHONPATH=training python3 -m kvgate_train.evict_ref --model models/kvgate-default \\
        --policy locret --weights models/kvgate-default/locret.safetensors \\
        --text "..." --budget 64 --chunk 32 --stabilizers 16 --out ref.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .model import LlamaForCausalLM, WeightsError, apply_rope, rope_cos_sin

POLICIES = ("locret", "attention-gate")
POSITION_MODES = ("reassign", "original")


@dataclass
class HeadCache:
    k: torch.Tensor      # [n, d] pre-RoPE keys
    v: torch.Tensor      # [n, d]
    score: torch.Tensor  # [n] float32 (Locret score, or gate probability)
    pos: torch.Tensor    # [n] int64 original positions


@dataclass
class Params:
    policy: str
    budget: int = 0          # 0: no budget (Attention-Gate only; Locret needs one)
    chunk: int = 512
    stabilizers: int = 0
    n_loc: int = 0
    slack: int = 16
    position: str = ""       # "" -> the policy's default
    tau: Optional[float] = None

    def resolved_position(self) -> str:
        if self.position:
            return self.position
        return "reassign" if self.policy == "locret" else "original"


@dataclass
class Trace:
    """What the reference records: per layer, per KV head, per token the score (Locret) or
    probability and flag (Attention-Gate), computed when the token ran; the logits of every
    token; and the retained positions after prefill and at the end."""
    scores: list = field(default_factory=list)   # [L] of [n_kv, N] float
    flags: list = field(default_factory=list)    # [L] of [n_kv, N] int (Attention-Gate)
    logits: list = field(default_factory=list)   # per token [vocab]
    evictions: int = 0


def keep_indices(score: torch.Tensor, keep: int, protect_tail: int) -> torch.Tensor:
    """Indices (ascending) of the `keep` entries with the highest score, the last
    `protect_tail` entries counting as +inf; ties go to the more recent (higher) index, as in
    kvgate's C++ cache."""
    n = score.shape[0]
    if n <= keep:
        return torch.arange(n)
    sc = score.double().clone()
    if protect_tail > 0:
        sc[max(0, n - protect_tail):] = math.inf
    order = sorted(range(n), key=lambda i: (-float(sc[i]), -i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


class EvictionReference:
    def __init__(self, model: LlamaForCausalLM, params: Params, heads=None, gates=None):
        self.m, self.p = model, params
        self.cfg = model.config
        self.heads, self.gates = heads, gates
        if params.policy not in POLICIES:
            raise ValueError(f"unknown policy {params.policy!r} (expected one of {POLICIES})")
        if params.policy == "locret":
            if heads is None:
                raise ValueError("locret needs retaining heads (--weights)")
            if params.budget <= 0:
                raise ValueError("locret needs a budget")
            if params.budget <= params.stabilizers:
                raise ValueError(f"budget {params.budget} must exceed the stabilizers "
                                 f"{params.stabilizers}")
        if params.policy == "attention-gate" and gates is None:
            raise ValueError("attention-gate needs gates (--weights)")
        if params.chunk <= 0:
            raise ValueError("chunk must be positive")
        if params.resolved_position() not in POSITION_MODES:
            raise ValueError(f"position must be one of {POSITION_MODES}")
        self.tau = params.tau if params.tau is not None else (gates.tau if gates else 0.5)
        L, n_kv, d = self.cfg.num_hidden_layers, self.cfg.num_key_value_heads, self.cfg.head_dim
        empty = lambda: HeadCache(torch.zeros(0, d), torch.zeros(0, d), torch.zeros(0),
                                  torch.zeros(0, dtype=torch.long))
        self.cache = [[empty() for _ in range(n_kv)] for _ in range(L)]
        # Attention-Gate: the gate's own keys/values over every token so far, per layer.
        self.gate_kv: list = [None] * L
        self.n_seen = 0
        self.trace = Trace(scores=[[[] for _ in range(n_kv)] for _ in range(L)],
                           flags=[[[] for _ in range(n_kv)] for _ in range(L)])

    # ---------------------------------------------------------------------------- running
    @torch.no_grad()
    def run(self, ids: list[int], evict: str) -> torch.Tensor:
        """Runs `ids` (the next tokens of the sequence) as one step; evict: "chunk" (Locret
        prefill eviction with stabilizers), "last" (without), "decode" (the slack rule) or
        "none". Returns logits [T, vocab]."""
        m, cfg = self.m, self.cfg
        T = len(ids)
        start = self.n_seen
        x = m.model.embed_tokens(torch.tensor(ids))  # [T, D]
        for li, layer in enumerate(m.model.layers):
            h = layer.input_layernorm(x)
            x = x + self._attention(li, layer.self_attn, h, start, evict)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = F.linear(m.model.norm(x), m.output_weight()).float()
        self.n_seen += T
        self.trace.logits.extend(logits)
        return logits

    def _attention(self, li, attn, h, start, evict):
        cfg, p = self.cfg, self.p
        T = h.shape[0]
        nh, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        g = nh // n_kv
        q = attn.q_proj(h).view(T, nh, d)
        k = attn.k_proj(h).view(T, n_kv, d)
        v = attn.v_proj(h).view(T, n_kv, d)
        new_pos = torch.arange(start, start + T)
        if p.policy == "locret":
            score = self.heads.layer_scores(li, q[None], k[None], v[None])[0].float()  # [T, n_kv]
            visible = torch.ones(n_kv, T, dtype=torch.bool)
        else:
            score, visible = self._gate(li, h)  # [T, n_kv] probabilities, [n_kv, T] flags
        reassign = p.resolved_position() == "reassign"
        out = torch.zeros(T, nh, d)
        for j in range(n_kv):
            c = self.cache[li][j]
            n_c = c.k.shape[0]
            self.trace.scores[li][j].extend(score[:, j].tolist())
            if p.policy == "attention-gate":
                self.trace.flags[li][j].extend(visible[j].int().tolist())
            if reassign:
                kpos = torch.arange(n_c + T)
            else:
                kpos = torch.cat([c.pos, new_pos])
            qpos = kpos[n_c:]
            keys = torch.cat([c.k, k[:, j]])
            vals = torch.cat([c.v, v[:, j]])
            cos_k, sin_k = rope_cos_sin(kpos, d, cfg.rope_theta, torch.float32)
            kr = apply_rope(keys[None, None], cos_k, sin_k)[0, 0]
            cos_q, sin_q = rope_cos_sin(qpos, d, cfg.rope_theta, torch.float32)
            qs = q[:, j * g:(j + 1) * g].transpose(0, 1)  # [g, T, d]
            qr = apply_rope(qs[:, None], cos_q, sin_q)[:, 0]
            logits = qr @ kr.T / math.sqrt(d)  # [g, T, n_c + T]
            # Query i sees the cache, itself, and earlier chunk tokens that are visible.
            allow = torch.zeros(T, n_c + T, dtype=torch.bool)
            allow[:, :n_c] = True
            tri = torch.ones(T, T, dtype=torch.bool).tril(-1) & visible[j][None, :]
            allow[:, n_c:] = tri | torch.eye(T, dtype=torch.bool)
            logits = logits.masked_fill(~allow, float("-inf"))
            out[:, j * g:(j + 1) * g] = (torch.softmax(logits, -1) @ vals).transpose(0, 1)
            # Store the chunk (Attention-Gate: only the flagged tokens), then evict.
            keep_new = visible[j]
            c = HeadCache(torch.cat([c.k, k[keep_new, j]]), torch.cat([c.v, v[keep_new, j]]),
                          torch.cat([c.score, score[keep_new, j]]),
                          torch.cat([c.pos, new_pos[keep_new]]))
            c = self._evict(c, evict)
            self.cache[li][j] = c
        return attn.o_proj(out.reshape(T, nh * d))

    def _gate(self, li, h):
        gate = self.gates.layers[li]
        q, k, v = gate.project(h[None])  # [1, H, T, d_ag]
        past = 0
        if self.gate_kv[li] is not None:
            pk, pv = self.gate_kv[li]
            past = pk.shape[2]
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        self.gate_kv[li] = (k, v)
        prob = torch.sigmoid(gate.logits(q, k, v, past=past)[0].float())  # [T, n_kv]
        flags = prob > self.tau
        if past == 0:
            flags[0] = True
            prob = prob.clone()
        return prob, flags.T.contiguous()

    def _evict(self, c: HeadCache, evict: str) -> HeadCache:
        p = self.p
        n = c.k.shape[0]
        if evict == "none" or p.budget <= 0:
            return c
        if evict == "decode" and n < p.budget + p.slack:
            return c
        if n <= p.budget:
            return c
        if p.policy == "locret":
            protect = 0 if evict == "last" else p.stabilizers
            idx = keep_indices(c.score, p.budget, protect)
        else:
            sc = c.score.clone()
            sc[c.pos == 0] = math.inf  # the first token is never evicted
            idx = keep_indices(sc, p.budget, 0)
        self.trace.evictions += n - len(idx)
        return HeadCache(c.k[idx], c.v[idx], c.score[idx], c.pos[idx])

    # --------------------------------------------------------------------------- drivers
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Returns the last prompt token's logits."""
        p = self.p
        N = len(ids)
        if p.policy == "locret":
            prefix = max(0, N - p.n_loc)
            for s in range(0, prefix, p.chunk):
                e = min(s + p.chunk, prefix)
                logits = self.run(ids[s:e], "chunk" if e < prefix else "last")
            for s in range(prefix, N, p.chunk):
                logits = self.run(ids[s:min(s + p.chunk, N)], "none")
        else:
            for s in range(0, N, p.chunk):
                logits = self.run(ids[s:min(s + p.chunk, N)], "chunk")
        return logits[-1]

    def decode_greedy(self, first_logits: torch.Tensor, n: int) -> list[int]:
        out = []
        logits = first_logits
        for _ in range(n):
            nxt = int(logits.argmax())
            out.append(nxt)
            logits = self.run([nxt], "decode")[-1]
        return out

    def retained(self) -> list[list[list[int]]]:
        """[L][n_kv] retained original positions, ascending."""
        return [[c.pos.tolist() for c in layer] for layer in self.cache]


def dump(ref: EvictionReference, ids: list[int], decode: int) -> dict:
    last = ref.prefill(ids)
    retained_prefill = ref.retained()
    generated = ref.decode_greedy(last, decode) if decode > 0 else []
    n_kv = ref.cfg.num_key_value_heads
    seen = sum(ref.n_seen for _ in range(1))
    kept = sum(len(h) for layer in ref.retained() for h in layer)
    total = seen * n_kv * ref.cfg.num_hidden_layers
    out = {
        "policy": ref.p.policy,
        "params": {"budget": ref.p.budget, "chunk": ref.p.chunk,
                   "stabilizers": ref.p.stabilizers, "n_loc": ref.p.n_loc,
                   "slack": ref.p.slack, "position": ref.p.resolved_position(),
                   "tau": ref.tau if ref.p.policy == "attention-gate" else None},
        "token_ids": ids,
        "generated": generated,
        "scores": ref.trace.scores,              # [L][n_kv][tokens run], in run order
        "retained_after_prefill": retained_prefill,
        "retained": ref.retained(),
        "logits": [row.tolist() for row in ref.trace.logits],  # [tokens run][vocab]
        "eviction_ratio": 1 - kept / total if total else 0.0,
    }
    if ref.p.policy == "attention-gate":
        out["flags"] = ref.trace.flags
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m kvgate_train.evict_ref",
        description="PyTorch reference of inference with Locret or Attention-Gate eviction: "
                    "dumps per-layer per-head scores (or gate flags), retained positions and "
                    "logits for given token ids as JSON.")
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--policy", choices=POLICIES, required=True)
    ap.add_argument("--weights", required=True, help="retaining heads or gates (safetensors)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="comma-separated token ids")
    src.add_argument("--text", help="text, tokenized with the model's tokenizer.json (with BOS)")
    ap.add_argument("--budget", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--stabilizers", type=int, default=0)
    ap.add_argument("--n-loc", type=int, default=0, help="Locret: protected prompt tail")
    ap.add_argument("--slack", type=int, default=16, help="decode eviction slack")
    ap.add_argument("--position", choices=POSITION_MODES, help="default: the policy's")
    ap.add_argument("--tau", type=float, help="Attention-Gate threshold (default: the file's)")
    ap.add_argument("--decode", type=int, default=0, help="greedy tokens to generate after")
    ap.add_argument("--out", help="JSON file (default: stdout)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = LlamaForCausalLM.from_pretrained(args.model).eval()
        if args.ids is not None:
            ids = [int(t) for t in args.ids.split(",") if t.strip()]
        else:
            from .tokenizer import load_tokenizer
            tok, bos, _ = load_tokenizer(args.model)
            ids = [bos] + tok.encode(args.text, add_special_tokens=False).ids
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad or not ids:
            raise ValueError(f"token ids must be in [0, {model.config.vocab_size}): {bad[:3]}")
        heads = gates = None
        if args.policy == "locret":
            from .locret import load_heads
            heads = load_heads(args.weights, model.config)
        else:
            from .gates import load_gates
            gates = load_gates(args.weights, model.config)
        params = Params(args.policy, args.budget, args.chunk, args.stabilizers, args.n_loc,
                        args.slack, args.position or "", args.tau)
        ref = EvictionReference(model, params, heads=heads, gates=gates)
    except (WeightsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = dump(ref, ids, args.decode)
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.out}: {len(ids)} prompt tokens, {len(result['generated'])} generated, "
              f"eviction ratio {result['eviction_ratio']:.3f}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
