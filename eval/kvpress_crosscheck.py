#!/usr/bin/env python3
"""kvgate's eviction policies against NVIDIA's kvpress on the same model, prompts and ratios.

kvpress (PyPI `kvpress`, with Hugging Face `transformers`; not a dependency of kvgate) is the
reference implementation of the training-free presses. For every press below and compression
ratio, on held-out retrieval prompts of the default model (passkey, multi-key, variable
tracking; context ~2K tokens):

1. Retained positions: the context alone through kvpress (the press compresses it during the
   prefill, as its pipeline does) and through `kvgate generate --score-prompt --dump-retained
   --kv-prefill whole` with the budget kvpress keeps (compute_n_kept); per (layer, KV head)
   the overlap |kvpress ∩ kvgate| / |kvpress| and whether the sets are equal.
2. Accuracy: the question excluded from compression (kvpress: prefilled after the compressed
   context, as its pipeline does; kvgate: --kv-protected-tail over the question's tokens),
   then greedy decoding of the answer with no eviction during decode (kvgate: a decode slack
   larger than the answer); exact match of the answer, both systems.

    .venv/bin/pip install kvpress    # brings torch and transformers
    PYTHONPATH=training .venv/bin/python eval/kvpress_crosscheck.py \\
        --model models/kvgate-default --kvgate build/cli/kvgate --out docs/eval/kvpress

Writes results.json (the fixture: every overlap and answer) and results.md into --out and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "training"))
sys.path.insert(0, os.path.join(REPO, "eval"))

from run_eval import run_kvgate  # noqa: E402  (kvgate generate --json, one thread)

RATIOS = (0.25, 0.5, 0.75, 0.875)
SNAP_WINDOW = 64  # kvpress's SnapKV default window


def presses():
    """name -> (kvpress press for a ratio, kvgate flags, attention implementation kvpress needs)."""
    from kvpress import (AdaKVPress, ExpectedAttentionPress, ObservedAttentionPress,
                         SnapKVPress, StreamingLLMPress, TOVAPress)

    snap = ["--kv-policy", "snapkv", "--kv-window", str(SNAP_WINDOW), "--kv-pool", "avg"]
    ea = ["--kv-policy", "expected-attention", "--kv-sinks", "4", "--kv-ea-future", "512"]

    def expected(r):
        return ExpectedAttentionPress(compression_ratio=r, n_future_positions=512, n_sink=4,
                                      use_covariance=True, use_vnorm=True)

    return {
        "streaming": (lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4),
                      ["--kv-policy", "streaming", "--kv-sinks", "4", "--kv-position",
                       "original"], "sdpa"),
        "snapkv": (lambda r: SnapKVPress(compression_ratio=r, window_size=SNAP_WINDOW,
                                         kernel_size=5), snap, "sdpa"),
        "tova": (lambda r: TOVAPress(compression_ratio=r), ["--kv-policy", "tova"], "sdpa"),
        "observed-attention / h2o": (lambda r: ObservedAttentionPress(compression_ratio=r),
                                     ["--kv-policy", "h2o"], "eager"),
        "expected-attention": (expected, ea, "sdpa"),
        "adakv snapkv": (lambda r: AdaKVPress(SnapKVPress(compression_ratio=r,
                                                          window_size=SNAP_WINDOW,
                                                          kernel_size=5)),
                         snap + ["--kv-allocation", "adaptive"], "sdpa"),
        "adakv expected-attention": (lambda r: AdaKVPress(expected(r)),
                                     ea + ["--kv-allocation", "adaptive"], "sdpa"),
    }


def kvpress_kept(press, model, context_ids):
    """Prefill `context_ids` under `press`; per layer, per KV head, the kept positions."""
    import torch
    from kvpress import AdaKVPress
    from transformers import DynamicCache

    kept: dict[int, list[set[int]]] = {}
    inner = press.compress

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        k2, v2 = inner(module, hidden_states, keys, values, attentions, kwargs)
        n_heads, k_len = keys.shape[1], keys.shape[2]
        if isinstance(press, AdaKVPress):
            sets = [set(range(k_len)) for _ in range(n_heads)]
            _, heads, seqs = module.masked_key_indices
            for h, s in zip(heads.tolist(), seqs.tolist()):
                sets[h].discard(s)
        else:
            # The kept rows are rows of the input keys (a gather): find each one's position.
            sets = []
            for h in range(n_heads):
                where = {keys[0, h, i].numpy().tobytes(): i for i in range(k_len)}
                sets.append({where[k2[0, h, j].numpy().tobytes()] for j in range(k2.shape[2])})
        kept[module.layer_idx] = sets
        return k2, v2

    press.compress = compress
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=torch.tensor([context_ids]), past_key_values=cache)
    press.compress = inner
    return [kept[i] for i in sorted(kept)], cache


def kvpress_answer(press, model, context_ids, question_ids, max_new, eos):
    """kvpress's pipeline (KVPressTextGenerationPipeline._forward / generate_answer) on ids."""
    import torch

    _, cache = kvpress_kept(press, model, context_ids)
    pos = torch.arange(len(context_ids), len(context_ids) + len(question_ids)).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([question_ids]), past_key_values=cache,
                    position_ids=pos, logits_to_keep=1)
        ids = [int(out.logits[0, -1].argmax())]
        nxt = pos[:, -1:] + 1
        for i in range(max_new - 1):
            if ids[-1] == eos:
                break
            out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache,
                        position_ids=nxt + i)
            ids.append(int(out.logits[0, -1].argmax()))
    return ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(REPO, "models", "kvgate-default"))
    ap.add_argument("--kvgate", default=os.path.join(REPO, "build", "cli", "kvgate"))
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "eval", "kvpress"))
    ap.add_argument("--context", type=int, default=2040, help="prompt tokens (context + question)")
    ap.add_argument("--samples", type=int, default=4, help="prompts per task")
    ap.add_argument("--tasks", default="passkey,kv,vartrack")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--presses", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args(argv)

    import torch
    from kvpress.utils import compute_n_kept
    from transformers import LlamaForCausalLM

    from kvgate_train.data import CorpusBuilder
    from kvgate_train.tokenizer import load_tokenizer

    torch.set_num_threads(2)
    tok, bos, eos = load_tokenizer(args.model)
    builder = CorpusBuilder(tok, seed=args.seed, split="heldout", filler="text", bos_id=bos,
                            eos_id=eos)
    prompts = []  # (task, context ids, question ids, answer text, max new tokens)
    for task in args.tasks.split(","):
        for i in range(args.samples):
            s = builder.sample(i, args.context - 8, task)
            ids = builder.prompt_ids(s)
            q = len(tok.encode("\n" + s.prompt.rsplit("\n", 1)[1], add_special_tokens=False).ids)
            prompts.append((task, ids[:-q], ids[-q:], s.answer.strip(),
                            len(builder.answer_ids(s)) + 1))
    models = {impl: LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                     attn_implementation=impl).eval()
              for impl in ("sdpa", "eager")}
    table = presses()
    names = [n for n in table if not args.presses or n in args.presses.split(",")]
    results = {"model": os.path.relpath(args.model, REPO), "context": args.context,
               "samples_per_task": args.samples, "tasks": args.tasks.split(","),
               "ratios": list(RATIOS), "rows": []}
    t0 = time.time()
    for name in names:
        make, flags, impl = table[name]
        model = models[impl]
        for ratio in RATIOS:
            overlaps, equal, heads = [], 0, 0
            right = {"kvpress": 0, "kvgate": 0}
            agree = 0
            for task, ctx, question, answer, max_new in prompts:
                n_kept = compute_n_kept(len(ctx), ratio)
                common = ["--model", args.model, "--kv-budget", str(n_kept), "--kv-prefill",
                          "whole", "--kv-chunk", "4096", "--kv-decode-slack", "4096"] + flags
                # 1. Retained positions of the context alone.
                ref, _ = kvpress_kept(make(ratio), model, ctx)
                out = run_kvgate(args.kvgate, common + [
                    "--prompt-ids", ",".join(map(str, ctx)), "--score-prompt", "--dump-retained"])
                got = out["retained_positions"]
                for layer, sets in enumerate(ref):
                    for h, want in enumerate(sets):
                        have = set(got[layer][h])
                        overlaps.append(len(want & have) / max(1, len(want)))
                        equal += int(want == have)
                        heads += 1
                # 2. The answer, the question kept out of compression.
                ref_ids = kvpress_answer(make(ratio), model, ctx, question, max_new, eos)
                ref_text = tok.decode([i for i in ref_ids if i != eos]).strip()
                out = run_kvgate(args.kvgate, common + [
                    "--prompt-ids", ",".join(map(str, ctx + question)), "--kv-protected-tail",
                    str(len(question)), "--max-tokens", str(max_new), "--temperature", "0"])
                got_text = out["text"].strip()
                right["kvpress"] += int(ref_text == answer)
                right["kvgate"] += int(got_text == answer)
                agree += int(ref_text == got_text)
            row = {"press": name, "ratio": ratio, "overlap_mean": sum(overlaps) / len(overlaps),
                   "overlap_min": min(overlaps), "heads_equal": equal / heads,
                   "accuracy_kvpress": right["kvpress"] / len(prompts),
                   "accuracy_kvgate": right["kvgate"] / len(prompts),
                   "answers_equal": agree / len(prompts)}
            results["rows"].append(row)
            print(f"{name:26s} {ratio:6.3f}  overlap {row['overlap_mean']:.4f} "
                  f"(min {row['overlap_min']:.3f}, {row['heads_equal']:.0%} heads equal)  "
                  f"accuracy kvpress {row['accuracy_kvpress']:.2f} kvgate "
                  f"{row['accuracy_kvgate']:.2f}  same answer {row['answers_equal']:.0%}  "
                  f"[{time.time() - t0:.0f} s]", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"{len(prompts)} held-out prompts ({', '.join(results['tasks'])}; "
             f"{args.samples} each, {args.context} tokens), {results['model']}.", "",
             "| press (kvpress / kvgate) | compression | retained overlap mean | min | heads "
             "identical | accuracy kvpress | accuracy kvgate | same answer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['press']} | {r['ratio']:.1%} | {r['overlap_mean']:.4f} | "
                     f"{r['overlap_min']:.3f} | {r['heads_equal']:.0%} | "
                     f"{r['accuracy_kvpress']:.2f} | {r['accuracy_kvgate']:.2f} | "
                     f"{r['answers_equal']:.0%} |")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
