"""Held-out retrieval accuracy (exact match of the greedy answer) per task and context length,
with the full KV cache, and the mean NLL of held-out natural text. Prints a markdown table.

A sample of length L is a held-out corpus sample built to fit L tokens (BOS, context, question,
answer, EOS); the model sees the prompt (everything up to the question) and decodes greedily
until EOS or len(answer) + 2 tokens; the answer is right when the decoded text, stripped,
equals the expected answer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from .data import TASKS, CorpusBuilder, NaturalTextError, natural_text
from .model import LlamaForCausalLM, WeightsError
from .tokenizer import load_tokenizer


@torch.no_grad()
def retrieval_accuracy(model: LlamaForCausalLM, builder: CorpusBuilder, task: str, length: int,
                       samples: int, show_errors: int = 0) -> float:
    right = 0
    for i in range(samples):
        s = builder.sample(i, length, task)
        want = builder.answer_ids(s)
        out = model.generate_greedy(builder.prompt_ids(s), len(want) + 2,
                                    stop_ids=(builder.eos_id,))
        if out and out[-1] == builder.eos_id:
            out = out[:-1]
        got = builder.tok.decode(out)
        ok = got.strip() == s.answer.strip()
        right += ok
        if not ok and show_errors > 0:
            show_errors -= 1
            print(f"  [{task} {length} #{i}] want {s.answer.strip()!r} got {got.strip()!r}",
                  file=sys.stderr)
    return right / max(samples, 1)


@torch.no_grad()
def heldout_nll(model: LlamaForCausalLM, tok, bos: int, window: int, max_tokens: int,
                text_file=None) -> tuple[float, int]:
    """Mean NLL (nats/token) over the first `max_tokens` tokens of the held-out natural text,
    in non-overlapping windows of `window` tokens, each starting with BOS."""
    ids = tok.encode(natural_text("heldout", text_file), add_special_tokens=False).ids
    ids = ids[:max_tokens]
    device = model.model.embed_tokens.weight.device
    total, count = 0.0, 0
    for s in range(0, len(ids), window - 1):
        chunk = [bos] + ids[s:s + window - 1]
        if len(chunk) < 2:
            break
        x = torch.tensor([chunk], device=device)
        logits = model(x[:, :-1])
        nll = F.cross_entropy(logits[0], x[0, 1:], reduction="sum")
        total += float(nll)
        count += x.shape[1] - 1
    return total / max(count, 1), count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kvgate_train.eval_retrieval",
        description="Held-out retrieval accuracy (greedy exact match, full cache) per task and "
                    "context length, and held-out natural-text NLL; prints a markdown table.")
    ap.add_argument("--model", required=True, help="Hugging Face model directory with "
                    "tokenizer.json (e.g. training/runs/default/model)")
    ap.add_argument("--lengths", default="512,1024,2048")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--samples", type=int, default=50, help="per task and length")
    ap.add_argument("--filler", choices=("text", "noise", "mix"), default="text")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-file", help="plain-text file used instead of the KJV in training")
    ap.add_argument("--nll-tokens", type=int, default=32768,
                    help="held-out natural-text tokens for the NLL (0: skip)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--show-errors", type=int, default=0, help="print up to N wrong answers")
    ap.add_argument("--json-out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        model = LlamaForCausalLM.from_pretrained(args.model, device=args.device).eval()
        tok, bos, eos = load_tokenizer(args.model)
        builder = CorpusBuilder(tok, seed=args.seed, split="heldout", filler=args.filler,
                                text_file=args.text_file, bos_id=bos, eos_id=eos)
    except (WeightsError, FileNotFoundError, ValueError, NaturalTextError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lengths = [int(x) for x in args.lengths.split(",")]
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASKS:
            print(f"error: unknown task {t!r} (expected {TASKS})", file=sys.stderr)
            return 1
    too_long = [n for n in lengths if n > model.config.max_position_embeddings]
    if too_long:
        print(f"note: lengths {too_long} exceed the model's max_position_embeddings "
              f"({model.config.max_position_embeddings})", file=sys.stderr)
    t0 = time.time()
    acc: dict[str, dict[int, float]] = {t: {} for t in tasks}
    for n in lengths:
        for t in tasks:
            acc[t][n] = retrieval_accuracy(model, builder, t, n, args.samples, args.show_errors)
            print(f"{t} @ {n}: {acc[t][n]:.1%} ({time.time() - t0:.0f}s)", file=sys.stderr,
                  flush=True)
    nll = None
    if args.nll_tokens > 0:
        nll, count = heldout_nll(model, tok, bos, max(lengths), args.nll_tokens, args.text_file)

    print(f"Held-out retrieval accuracy (greedy exact match, full cache, {args.samples} samples "
          f"per cell, filler {args.filler}, seed {args.seed}), model {args.model}\n")
    print("| task | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for t in tasks:
        print(f"| {t} | " + " | ".join(f"{acc[t][n]:.1%}" for n in lengths) + " |")
    if nll is not None:
        print(f"\nHeld-out natural text: mean NLL {nll:.4f} nats/token over {count} tokens "
              f"(perplexity {math.exp(nll):.2f}), windows of {max(lengths)} tokens")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "samples": args.samples, "filler": args.filler,
                       "seed": args.seed, "accuracy": acc, "heldout_nll": nll}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
