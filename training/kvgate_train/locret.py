"""Locret retaining heads for a frozen Llama-family model: labels, training, export, evaluation.

Follows ../shared/design/EVICTION-REFERENCE.md sections 1.2-1.3:
- Label (causal importance score, CIS) of prompt token k in layer l, KV head j: the largest
  pre-softmax attention logit (QK^T / sqrt(d), RoPE applied) that any answer token gives k, the
  max taken over the query heads of j's GQA group.
- Head per layer: score = fc2(silu(fc1(concat(q, k, v)))) over the pre-RoPE projections of each
  token, fc1: (h + 2 n_kv) d -> d_R, fc2: d_R -> n_kv, no biases.
- Loss: mean SmoothL1(pred, label) (beta 1) + alpha * sum over layers of MSE(pred[:, k],
  pred[:, k+1]); the backbone runs over the prompt tokens only and is frozen.
- AdamW (betas 0.9, 0.95), linear warm-up over `--warmup-frac` of the steps then linear decay,
  gradient clipping by value (0.5), batch 1.
- Metric: top-10% overlap between predicted and label scores per (layer, KV head).

Export (../shared/design/EVICTION.md): safetensors with
`model.layers.{i}.retaining_head.fc1.weight` [d_R, (h + 2 n_kv) d] and
`model.layers.{i}.retaining_head.fc2.weight` [n_kv, d_R], metadata `kvgate.kind = locret` plus
the model shape it was made for.

    PYTHONPATH=training python3 -m kvgate_train.locret --model models/kvgate-default \\
        --out models/kvgate-default/locret.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import NaturalTextError
from .features import DATA_SOURCES, FILLER_HELP, load_frozen
from .model import Capture, LlamaConfig, LlamaForCausalLM, WeightsError

KIND = "locret"


class RetainingHeads(nn.Module):
    """One retaining head per layer."""

    def __init__(self, cfg: LlamaConfig, d_r: int = 1024):
        super().__init__()
        self.cfg, self.d_r = cfg, d_r
        d_in = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        self.fc1 = nn.ModuleList(nn.Linear(d_in, d_r, bias=False)
                                 for _ in range(cfg.num_hidden_layers))
        self.fc2 = nn.ModuleList(nn.Linear(d_r, cfg.num_key_value_heads, bias=False)
                                 for _ in range(cfg.num_hidden_layers))

    def layer_scores(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> torch.Tensor:
        """q [B, T, h, d], k/v [B, T, n_kv, d] (pre-RoPE) -> scores [B, T, n_kv]."""
        x = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
        return self.fc2[layer](F.silu(self.fc1[layer](x.to(self.fc1[layer].weight.dtype))))

    def scores(self, capture: Capture) -> torch.Tensor:
        """From a Capture(qkv=True) of a forward pass: [L, B, T, n_kv]."""
        return torch.stack([self.layer_scores(i, r["q"], r["k"], r["v"])
                            for i, r in enumerate(capture.layers)])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(self.cfg.num_hidden_layers):
            out[f"model.layers.{i}.retaining_head.fc1.weight"] = self.fc1[i].weight
            out[f"model.layers.{i}.retaining_head.fc2.weight"] = self.fc2[i].weight
        return out


def metadata(cfg: LlamaConfig, d_r: int, extra: Optional[dict] = None) -> dict[str, str]:
    md = {"kvgate.kind": KIND, "kvgate.num_layers": str(cfg.num_hidden_layers),
          "kvgate.num_attention_heads": str(cfg.num_attention_heads),
          "kvgate.num_key_value_heads": str(cfg.num_key_value_heads),
          "kvgate.head_dim": str(cfg.head_dim), "kvgate.d_r": str(d_r)}
    md.update(extra or {})
    return md


def save_heads(heads: RetainingHeads, path: str, extra: Optional[dict] = None) -> None:
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in heads.tensors().items()}
    save_file(tensors, path, metadata=metadata(heads.cfg, heads.d_r, extra))
    os.chmod(path, 0o644)


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    if not os.path.exists(path):
        raise WeightsError(f"{path}: not found")
    try:
        with safe_open(path, framework="pt") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                           f"{e}") from None
    return tensors, md


def fill_from(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
              path: str) -> None:
    """Copies `tensors` (read from `path`) into `params` after checking that the names match
    exactly and every shape and value is right; WeightsError names the first problem."""
    for name, p in params.items():
        if name not in tensors:
            raise WeightsError(f"{path}: missing tensor {name}")
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise WeightsError(f"{path}: tensor {name} has shape {list(tensors[name].shape)}, "
                               f"the model needs {list(p.shape)}: made for another model")
        if not torch.isfinite(tensors[name]).all():
            raise WeightsError(f"{path}: tensor {name} holds NaN or Inf")
    extra = [k for k in tensors if k not in params]
    if extra:
        raise WeightsError(f"{path}: unexpected tensors, e.g. {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].float())


def load_heads(path: str, cfg: LlamaConfig) -> RetainingHeads:
    """Loads a retaining-heads file and checks it against the model's config."""
    tensors, md = read_safetensors(path)
    kind = md.get("kvgate.kind")
    if kind != KIND:
        raise WeightsError(f"{path}: kvgate.kind is {kind!r}, expected {KIND!r} (retaining "
                           "heads)")
    n_layers = sum(1 for k in tensors if k.endswith("retaining_head.fc1.weight"))
    if n_layers != cfg.num_hidden_layers:
        raise WeightsError(f"{path}: has retaining heads for {n_layers} layers, the model has "
                           f"{cfg.num_hidden_layers}: made for another model")
    fc1 = tensors.get("model.layers.0.retaining_head.fc1.weight")
    if fc1 is None or fc1.dim() != 2:
        raise WeightsError(f"{path}: missing model.layers.0.retaining_head.fc1.weight")
    heads = RetainingHeads(cfg, d_r=fc1.shape[0])
    fill_from(heads.tensors(), tensors, path)
    return heads


# ------------------------------------------------------------------------------- labels


@torch.no_grad()
def cis_labels(model: LlamaForCausalLM, ids: list[int], n_prompt: int) -> torch.Tensor:
    """Causal importance scores [L, n_kv, n_prompt] of the prompt tokens of `ids` (prompt then
    answer): max over answer queries and over the query heads of each GQA group of the
    pre-softmax attention logits."""
    if not 0 < n_prompt < len(ids):
        raise ValueError(f"need a prompt and an answer (n_prompt {n_prompt}, {len(ids)} ids)")
    cfg = model.config
    device = model.model.embed_tokens.weight.device
    cap = Capture(logits=True)
    model(torch.tensor([ids], device=device), capture=cap)
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    out = []
    for rec in cap.layers:
        lg = rec["logits"][0, :, n_prompt:, :n_prompt]  # [h, n_answer, n_prompt]
        lg = lg.reshape(cfg.num_key_value_heads, g, lg.shape[1], n_prompt)
        out.append(lg.amax(dim=(1, 2)))
    return torch.stack(out).float()


def top_overlap(pred: torch.Tensor, label: torch.Tensor, frac: float = 0.1) -> torch.Tensor:
    """pred/label [..., n] -> overlap of their top-`frac` index sets, [...] in [0, 1]."""
    n = pred.shape[-1]
    k = max(1, int(round(frac * n)))
    tp = pred.topk(k, dim=-1).indices
    tl = label.topk(k, dim=-1).indices
    hit = torch.zeros(pred.shape, dtype=torch.bool, device=pred.device)
    hit.scatter_(-1, tl, True)
    return hit.gather(-1, tp).float().sum(-1) / k


def head_loss(pred: torch.Tensor, label: torch.Tensor, alpha: float) -> torch.Tensor:
    """pred/label [L, T, n_kv] -> SmoothL1 mean + alpha * sum_l MSE(pred[l, :-1], pred[l, 1:])."""
    main = F.smooth_l1_loss(pred, label, reduction="mean", beta=1.0)
    smooth = sum(F.mse_loss(p[:-1], p[1:]) for p in pred) if pred.shape[1] > 1 else 0.0
    return main + alpha * smooth


def predict(model: LlamaForCausalLM, heads: RetainingHeads, ids: list[int]) -> torch.Tensor:
    """Retaining-head scores [L, T, n_kv] for `ids` (backbone frozen, no grad through it)."""
    device = model.model.embed_tokens.weight.device
    cap = Capture(qkv=True)
    with torch.no_grad():
        model.hidden_states(torch.tensor([ids], device=device), capture=cap)
    return heads.scores(cap)[:, 0]


# -------------------------------------------------------------------------------- train


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m kvgate_train.locret",
        description="Train Locret retaining heads for a frozen Hugging Face Llama-family model: "
                    "generate causal-importance labels, fit the heads (SmoothL1 + smoothness), "
                    "report the top-10%% overlap on held-out data and export them in kvgate's "
                    "format.")
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--out", required=True, help="retaining-heads safetensors file to write")
    ap.add_argument("--data", choices=DATA_SOURCES, default="tasks",
                    help="training sequences (see features.py; default %(default)s)")
    ap.add_argument("--text-file", help="natural text for --data text/tasks instead of the KJV")
    ap.add_argument("--filler-sources", default="kjv", help=FILLER_HELP)
    ap.add_argument("--decoys", type=int, default=0,
                    help="decoy sentences with other numbers in each passkey sample")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--tail", type=int, default=32,
                    help="for text/sampled sequences: the last TAIL tokens act as the answer")
    ap.add_argument("--train-samples", type=int, default=400)
    ap.add_argument("--heldout-samples", type=int, default=40)
    ap.add_argument("--steps", type=int, default=1200, help="optimizer steps (batch 1)")
    ap.add_argument("--d-r", type=int, default=1024, help="hidden size of the heads")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup-frac", type=float, default=2 / 3,
                    help="fraction of the steps of linear warm-up (paper: 2000 of 3000)")
    ap.add_argument("--alpha", type=float, default=0.0025, help="smoothness weight")
    ap.add_argument("--clip-value", type=float, default=0.5, help="gradient clipping by value")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--report", help="write the metrics as JSON here (default: OUT with .json)")
    return ap


def lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    return max(0.0, (steps - step) / max(steps - warmup, 1))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        model, device, train_src, held_src = load_frozen(args)
        seq_len = train_src.seq_len
    except (WeightsError, ValueError, NaturalTextError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = model.config

    def make_set(src, n, what):
        out = []
        t = time.time()
        for i in range(n):
            s = src.get(i)
            out.append((s.ids[:s.n_prompt], cis_labels(model, s.ids, s.n_prompt)))
            if (i + 1) % max(1, n // 5) == 0 or i + 1 == n:
                print(f"labels ({what}): {i + 1}/{n} sequences, {time.time() - t:.0f} s",
                      flush=True)
        return out

    train = make_set(train_src, args.train_samples, "train")
    held = make_set(held_src, args.heldout_samples, "held-out")

    torch.manual_seed(args.seed)
    heads = RetainingHeads(cfg, args.d_r).to(device)
    opt = torch.optim.AdamW(heads.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=args.weight_decay)
    warmup = int(args.warmup_frac * args.steps)

    def evaluate(dataset):
        with torch.no_grad():
            losses, overlaps = [], []
            for ids, label in dataset:
                pred = predict(model, heads, ids)             # [L, T, n_kv]
                lab = label.permute(0, 2, 1).to(device)       # [L, T, n_kv]
                losses.append(float(head_loss(pred, lab, args.alpha)))
                overlaps.append(top_overlap(pred.permute(0, 2, 1), label.to(device)))  # [L, n_kv]
            ov = torch.stack(overlaps)  # [N, L, n_kv]
            return sum(losses) / len(losses), ov

    print(f"retaining heads: d_R {args.d_r}, "
          f"{sum(p.numel() for p in heads.parameters()) / 1e6:.2f}M parameters for "
          f"{cfg.num_hidden_layers} layers; {args.steps} steps", flush=True)
    loss0, ov0 = evaluate(held)
    print(f"before training: held-out loss {loss0:.4f}, top-10% overlap {ov0.mean():.3f}",
          flush=True)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    run_loss, n_run = 0.0, 0
    for step in range(args.steps):
        ids, label = train[int(order[step % len(train)])]
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, args.steps, warmup)
        pred = predict(model, heads, ids)
        loss = head_loss(pred, label.permute(0, 2, 1).to(device), args.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_value > 0:
            torch.nn.utils.clip_grad_value_(heads.parameters(), args.clip_value)
        opt.step()
        run_loss += float(loss.detach())
        n_run += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            el = time.time() - t0
            print(f"step {step + 1:5d}/{args.steps} | loss {run_loss / n_run:.4f} | lr "
                  f"{opt.param_groups[0]['lr']:.2e} | {el:.0f} s", flush=True)
            run_loss, n_run = 0.0, 0
    loss1, ov1 = evaluate(held)
    per_layer = [round(float(x), 4) for x in ov1.mean(dim=(0, 2))]
    print(f"after training: held-out loss {loss1:.4f}, top-10% overlap {ov1.mean():.3f} "
          f"(per layer {per_layer})", flush=True)
    extra = {"kvgate.model": os.path.basename(os.path.normpath(args.model)),
             "kvgate.trained": json.dumps({"data": args.data, "seq_len": seq_len,
                                           "steps": args.steps, "train_samples":
                                           args.train_samples})}
    save_heads(heads, args.out, extra)
    report = {"model": args.model, "out": args.out, "data": args.data, "seq_len": seq_len,
              "steps": args.steps, "d_r": args.d_r, "train_samples": args.train_samples,
              "heldout_samples": args.heldout_samples,
              "heldout_loss_before": loss0, "heldout_loss_after": loss1,
              "top10_overlap_before": float(ov0.mean()), "top10_overlap_after": float(ov1.mean()),
              "top10_overlap_per_layer": per_layer, "seconds": round(time.time() - t0, 1),
              "argv": sys.argv if argv is None else argv}
    rpath = args.report or os.path.splitext(args.out)[0] + ".json"
    with open(rpath, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out} and {rpath} ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
