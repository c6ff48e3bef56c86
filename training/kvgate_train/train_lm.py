"""Trains kvgate's default model from scratch on the package's corpus and exports it in the
Hugging Face layout.

The run is bounded in wall time (`--time-budget-minutes`, default 85, everything included):
the learning-rate schedule (linear warm-up, then cosine to `--min-lr-ratio`) and the
sequence-length curriculum advance with the fraction of the training time used, so a run ends
with its schedule complete whatever the machine's speed. `--max-steps` bounds it in steps as
well. Checkpoints (model, optimizer, data position, time used) are written every
`--checkpoint-minutes` and at the end; `--resume` continues from the last one.

Outputs in --out: checkpoint.pt, loss_log.csv, loss_curve.png, train_args.json, and model/
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from typing import Optional

import torch

from .data import CorpusBuilder, NaturalTextError
from .model import LlamaConfig, LlamaForCausalLM
from .tokenizer import load_tokenizer, save_tokenizer_dir, train_tokenizer, training_texts

# Model shapes (vocab from the tokenizer). `small` is the default; see training/README.md for
# the pilot measurements behind the choice.
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "medium": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6,
                   num_attention_heads=6, num_key_value_heads=2, head_dim=32),
    "base": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}
DEFAULT_PRESET = "small"
DEFAULT_CURRICULUM = "256:0.25,512:0.35,2048:0.4"
EXPORT_RESERVE_S = 20.0  # time kept at the end for the export and the plot


def parse_curriculum(spec: str) -> list[tuple[int, float]]:
    """"512:0.6,2048:0.4" -> [(512, 0.6), (2048, 1.0)]: (seq_len, progress at which it ends)."""
    stages, end = [], 0.0
    for part in spec.split(","):
        length, frac = part.split(":")
        end += float(frac)
        stages.append((int(length), end))
    if not stages or any(length <= 0 for length, _ in stages):
        raise ValueError(f"bad curriculum {spec!r}")
    stages[-1] = (stages[-1][0], float("inf"))
    return stages


def seq_len_at(stages: list[tuple[int, float]], progress: float) -> int:
    for length, end in stages:
        if progress < end:
            return length
    return stages[-1][0]


def lr_at(progress: float, step: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype (None: plain float32)."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    # auto: bf16 where it is fast (CUDA with bf16; CPUs: measured faster on this project's
    # 2-core AMD EPYC with torch.compile, see README).
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m kvgate_train.train_lm",
        description="Train the default kvgate model (small Llama, GQA, RoPE) from scratch on "
                    "KJV text + RULER-style retrieval tasks, within a time budget, and export it "
                    "in the Hugging Face layout.")
    ap.add_argument("--out", default="training/runs/default", help="run directory")
    ap.add_argument("--tokenizer", help="directory with tokenizer.json (default: train one into "
                    "OUT/tokenizer)")
    ap.add_argument("--vocab-size", type=int, default=2048, help="when training the tokenizer")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    for name in ("hidden-size", "intermediate-size", "num-hidden-layers", "num-attention-heads",
                 "num-key-value-heads", "head-dim"):
        ap.add_argument(f"--{name}", type=int, help="override the preset")
    ap.add_argument("--untied", action="store_true", help="separate lm_head (default: tied)")
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--curriculum", default=DEFAULT_CURRICULUM,
                    help="seq_len:fraction of the training time, ...; the last length is the "
                    "model's max_position_embeddings (default %(default)s)")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="tokens per optimizer step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="residual dropout (against memorizing the small natural-text corpus)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="every N steps, log the held-out natural-text NLL (0: only at the end)")
    ap.add_argument("--eval-tokens", type=int, default=8192,
                    help="held-out natural-text tokens per evaluation")
    ap.add_argument("--answer-weight", type=float, default=2.0,
                    help="loss = mean LM loss + this * mean loss on answer tokens")
    ap.add_argument("--kind-weights",
                    default="passkey:0.25,kv:0.25,vartrack:0.1,text:0.15,copy:0.25",
                    help="sample mix; copy = a segment repeated (dense induction signal)")
    ap.add_argument("--filler", choices=("text", "noise", "mix"), default="mix")
    ap.add_argument("--text-file", help="plain-text file to use instead of the KJV")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget-minutes", type=float, default=85.0,
                    help="wall time for the whole command, export included")
    ap.add_argument("--max-steps", type=int, default=0, help="0: no step limit")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                    help="autocast dtype (weights and optimizer stay float32)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--data-workers", type=int, default=0,
                    help="processes that build batches ahead of the GPU (0: build them in the "
                    "training loop, right for CPU training)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--export-dtype", choices=("float32", "bfloat16"), default="float32")
    return ap


def model_config(args, vocab_size: int, bos: int, eos: int, max_len: int) -> LlamaConfig:
    shape = dict(PRESETS[args.preset])
    for key in shape:
        v = getattr(args, key)
        if v is not None:
            shape[key] = v
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_len,
                       rope_theta=args.rope_theta, tie_word_embeddings=not args.untied,
                       bos_token_id=bos, eos_token_id=eos, **shape)


_WORKER_DATA = None


def _worker_batch(job):
    start, bsz, seq_len = job
    return _WORKER_DATA.batch(start, bsz, seq_len)


class BatchSource:
    """Training batches in sample order. With workers, up to 2 x workers batches are built ahead
    in forked processes; a batch built for a sequence length the curriculum has left is dropped
    (its sample indices are skipped, never reused)."""

    def __init__(self, data: CorpusBuilder, workers: int):
        global _WORKER_DATA
        self.data, self.pool, self.pending = data, None, []
        if workers > 0:
            import multiprocessing
            _WORKER_DATA = data
            self.pool = multiprocessing.get_context("fork").Pool(workers)
            self.depth = 2 * workers

    def get(self, start: int, bsz: int, seq_len: int):
        """((x, y, mask) arrays, next sample index)."""
        if self.pool is None:
            return self.data.batch(start, bsz, seq_len), start + bsz
        self.pending = [p for p in self.pending if p[1] == (bsz, seq_len)] or []
        nxt = self.pending[-1][0] + bsz if self.pending else start
        while len(self.pending) < self.depth:
            job = (nxt, bsz, seq_len)
            self.pending.append((nxt, (bsz, seq_len), self.pool.apply_async(_worker_batch, (job,))))
            nxt += bsz
        first, _, res = self.pending.pop(0)
        return res.get(), max(nxt, first + bsz)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None


def save_checkpoint(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def plot_losses(log_path: str, png_path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(open(log_path)))
    if not rows:
        return
    tok = [float(r["tokens"]) / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(tok, [float(r["lm_loss"]) for r in rows], label="LM loss (all tokens)")
    ax.plot(tok, [float(r["answer_loss"]) for r in rows], label="answer-token loss", alpha=0.8)
    copy = [float(r.get("copy_loss") or 0) for r in rows]
    if any(copy):
        ax.plot(tok, copy, label="copy-task loss (second copy)", alpha=0.8)
    eval_path = os.path.join(os.path.dirname(log_path), "eval_log.csv")
    evals = list(csv.DictReader(open(eval_path))) if os.path.exists(eval_path) else []
    if evals:
        ax.plot([float(r["tokens"]) / 1e6 for r in evals], [float(r["heldout_nll"]) for r in evals],
                "k--o", markersize=3, label="held-out natural text NLL")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def fmt_time(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def main(argv=None) -> int:
    t_start = time.time()
    args = build_parser().parse_args(argv)
    deadline = t_start + args.time_budget_minutes * 60 - EXPORT_RESERVE_S
    os.makedirs(args.out, exist_ok=True)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    amp_dtype = pick_dtype(args.dtype, device)
    stages = parse_curriculum(args.curriculum)
    max_len = max(length for length, _ in stages)
    kind_weights = {k: float(v) for k, v in (p.split(":") for p in args.kind_weights.split(","))}

    # Tokenizer.
    tok_dir = args.tokenizer or os.path.join(args.out, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        if args.tokenizer:
            print(f"error: {tok_dir}/tokenizer.json not found", file=sys.stderr)
            return 1
        print(f"training the tokenizer (vocab {args.vocab_size}) into {tok_dir}", flush=True)
        try:
            tok = train_tokenizer(training_texts(args.seed, args.text_file), args.vocab_size)
        except NaturalTextError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        save_tokenizer_dir(tok, tok_dir, max_len)
    tok, bos, eos = load_tokenizer(tok_dir)
    try:
        data = CorpusBuilder(tok, seed=args.seed, split="train", filler=args.filler,
                             text_file=args.text_file, kind_weights=kind_weights,
                             bos_id=bos, eos_id=eos)
    except NaturalTextError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    batches = BatchSource(data, args.data_workers)  # fork before CUDA starts
    cfg = model_config(args, tok.get_vocab_size(), bos, eos, max_len)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)
    model.init_weights(args.seed)
    model.set_dropout(args.dropout)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, args.beta2),
                            fused=device.type == "cuda")
    step, sample_index, tokens, train_time = 0, 0, 0, 0.0
    budget = None  # seconds of training the LR schedule and the curriculum are laid over
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    log_path = os.path.join(args.out, "loss_log.csv")
    if args.resume:
        if not os.path.exists(ckpt_path):
            print(f"error: --resume but {ckpt_path} does not exist", file=sys.stderr)
            return 1
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck["config"] != cfg.to_hf_dict():
            print(f"error: {ckpt_path} holds a different model shape; run without --resume or "
                  "with the same options", file=sys.stderr)
            return 1
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, sample_index, tokens, train_time = (ck["step"], ck["sample_index"], ck["tokens"],
                                                  ck["train_time"])
        budget = ck["budget"]  # the schedule of the original run continues
        print(f"resumed from {ckpt_path}: step {step}, {tokens / 1e6:.1f}M tokens, "
              f"{fmt_time(train_time)} trained", flush=True)
    else:
        with open(log_path, "w") as f:
            f.write("step,seq_len,lr,lm_loss,answer_loss,copy_loss,tokens,train_time_s,"
                    "tokens_per_s\n")
    with open(os.path.join(args.out, "train_args.json"), "w") as f:
        json.dump({"argv": sys.argv if argv is None else argv, "args": vars(args),
                   "config": cfg.to_hf_dict(), "device": str(device),
                   "amp_dtype": str(amp_dtype), "threads": torch.get_num_threads()}, f, indent=2)

    print(f"model: {cfg.num_parameters() / 1e6:.2f}M parameters ({args.preset}: "
          f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, heads "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, head_dim {cfg.head_dim}); "
          f"device {device}, autocast {amp_dtype}, threads {torch.get_num_threads()}", flush=True)

    def loss_fn(x, y, m):
        logits = model(x)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               y.reshape(-1), ignore_index=-100,
                                               reduction="none")
        valid = (y.reshape(-1) != -100).float()
        am = (m.reshape(-1) == 1).float()
        cm = (m.reshape(-1) == 2).float()
        lm = (ce * valid).sum() / valid.sum().clamp_min(1)
        ans = (ce * am).sum() / am.sum().clamp_min(1)
        copy = (ce * cm).sum() / cm.sum().clamp_min(1)
        return lm, ans, am.sum(), copy, cm.sum()

    step_fn = loss_fn if args.no_compile else torch.compile(loss_fn, dynamic=False)
    if budget is None:
        budget = max(deadline - time.time(), 1.0)
    elif train_time + (deadline - time.time()) < budget:
        print(f"note: {fmt_time(budget - train_time)} of training are left in the schedule but "
              "the time budget ends sooner; the run will stop early", flush=True)
    eval_path = os.path.join(args.out, "eval_log.csv")
    if not args.resume or not os.path.exists(eval_path):
        with open(eval_path, "w") as f:
            f.write("step,tokens,heldout_nll\n")

    evaluated = [-1]  # the step of the last evaluation

    def evaluate():
        from .eval_retrieval import heldout_nll
        evaluated[0] = step
        model.eval()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            nll, count = heldout_nll(model, tok, bos, max_len, args.eval_tokens, args.text_file)
        model.train()
        print(f"eval | step {step:6d} | held-out natural text NLL {nll:.4f} over {count} tokens",
              flush=True)
        with open(eval_path, "a") as f:
            f.write(f"{step},{tokens},{nll:.5f}\n")

    last_ckpt = time.time()
    win_tokens, win_time, win_lm, win_ans, win_n = 0, 0.0, 0.0, 0.0, 0
    win_cp, win_ncp = 0.0, 0
    model.train()
    while True:
        progress = train_time / budget
        if args.max_steps:
            progress = max(progress, step / args.max_steps)
        if progress >= 1.0 or time.time() >= deadline:
            break
        seq_len = seq_len_at(stages, progress)
        bsz = max(1, args.batch_tokens // seq_len)
        lr = lr_at(progress, step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.time()
        arrays, sample_index = batches.get(sample_index, bsz, seq_len)
        x, y, m = (torch.from_numpy(a).to(device, non_blocking=True) for a in arrays)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            try:
                lm, ans, n_ans, cp, n_cp = step_fn(x, y, m)
            except Exception as e:  # a compiler problem: fall back to eager mode once
                if step_fn is loss_fn:
                    raise
                print(f"warning: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); "
                      "continuing without it", flush=True)
                step_fn = loss_fn
                lm, ans, n_ans, cp, n_cp = step_fn(x, y, m)
        loss = lm + args.answer_weight * ans if n_ans > 0 else lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        dt = time.time() - t0
        step += 1
        train_time += dt
        tokens += bsz * seq_len
        win_tokens += bsz * seq_len
        win_time += dt
        win_lm += float(lm.detach())
        win_ans += float(ans.detach()) if n_ans > 0 else 0.0
        if n_cp > 0:
            win_cp += float(cp.detach())
            win_ncp += 1
        win_n += 1
        if step % args.log_every == 0 or step == 1:
            tps = win_tokens / max(win_time, 1e-9)
            remaining = min(max(budget - train_time, 0), max(deadline - time.time(), 0))
            if args.max_steps:
                remaining = min(remaining, (args.max_steps - step) * win_time / win_n)
            print(f"step {step:6d} | seq {seq_len:5d} | lm {win_lm / win_n:.4f} | "
                  f"answer {win_ans / win_n:.4f} | copy {win_cp / max(win_ncp, 1):.4f} | "
                  f"lr {lr:.2e} | {tps:8.0f} tok/s | "
                  f"{tokens / 1e6:7.2f}M tok | trained {fmt_time(train_time)} | "
                  f"ETA {fmt_time(remaining)}", flush=True)
            with open(log_path, "a") as f:
                f.write(f"{step},{seq_len},{lr:.6g},{win_lm / win_n:.5f},{win_ans / win_n:.5f},"
                        f"{win_cp / max(win_ncp, 1):.5f},{tokens},{train_time:.1f},{tps:.1f}\n")
            win_tokens, win_time, win_lm, win_ans, win_n = 0, 0.0, 0.0, 0.0, 0
            win_cp, win_ncp = 0.0, 0
        if args.eval_every and step % args.eval_every == 0:
            evaluate()
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            save_checkpoint(ckpt_path, _state(model, opt, cfg, step, sample_index, tokens,
                                              train_time, budget))
            last_ckpt = time.time()

    batches.close()
    if args.eval_tokens > 0 and evaluated[0] != step:
        evaluate()
    save_checkpoint(ckpt_path, _state(model, opt, cfg, step, sample_index, tokens, train_time,
                                      budget))
    export_dir = os.path.join(args.out, "model")
    model.save_pretrained(export_dir, dtype=getattr(torch, args.export_dtype))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(export_dir, name))
    plot_losses(log_path, os.path.join(args.out, "loss_curve.png"),
                f"kvgate {args.preset}: {cfg.num_parameters() / 1e6:.2f}M params")
    size_mb = os.path.getsize(os.path.join(export_dir, "model.safetensors")) / 1e6
    print(f"done: {step} steps, {tokens / 1e6:.2f}M tokens, trained {fmt_time(train_time)}, "
          f"total {fmt_time(time.time() - t_start)}; exported {export_dir} "
          f"(model.safetensors {size_mb:.1f} MB), loss curve {args.out}/loss_curve.png",
          flush=True)
    return 0


def _state(model, opt, cfg, step, sample_index, tokens, train_time, budget) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "config": cfg.to_hf_dict(), "step": step, "sample_index": sample_index,
            "tokens": tokens, "train_time": train_time, "budget": budget}


if __name__ == "__main__":
    sys.exit(main())
