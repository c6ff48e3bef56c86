#!/usr/bin/env python3
"""What --quantize costs in model quality: for each weight format (as stored, q8_0, q4_0, and
both with --quantize-all: the embedding and LM head quantized too) the
mean NLL of held-out text (natural text through the model's tokenizer, the windows
eval/run_eval.py scores) and the greedy agreement with the unquantized model over 200 generated
tokens from held-out prompts (the share of positions with the same token, and the tokens
before the first difference), all through `kvgate generate` with the full cache. Prints a
markdown table and writes it with the raw numbers to --out.

    PYTHONPATH=training .venv/bin/python eval/quantization_quality.py \\
        --model models/kvgate-default --out docs/eval/quantization
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "training"))


def generate(binary, args):
    proc = subprocess.run([binary, "generate", "--threads", "1", "--json"] + args,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"kvgate generate {' '.join(args)[:120]}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(REPO, "models", "kvgate-default"))
    ap.add_argument("--kvgate", default=os.path.join(REPO, "build", "cli", "kvgate"))
    ap.add_argument("--formats", default="none,q8_0,q4_0,q8_0-all,q4_0-all",
                    help="FORMAT-all: with --quantize-all (embedding and LM head too)")
    ap.add_argument("--windows", type=int, default=8, help="held-out text windows for the NLL")
    ap.add_argument("--context", type=int, default=1024, help="tokens per NLL window")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts for agreement")
    ap.add_argument("--tokens", type=int, default=200, help="greedy tokens per prompt")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    from kvgate_train.data import natural_text
    from kvgate_train.tokenizer import load_tokenizer
    tok, bos, _ = load_tokenizer(args.model)
    ids = tok.encode(natural_text("heldout"), add_special_tokens=False).ids
    windows = [[bos] + ids[w * (args.context - 1):(w + 1) * (args.context - 1)]
               for w in range(args.windows)]
    # Agreement prompts: 48-token slices of held-out text after the NLL windows.
    start = args.windows * (args.context - 1)
    prompts = [[bos] + ids[start + 48 * p:start + 48 * (p + 1)] for p in range(args.prompts)]

    rows, raw = [], {}
    reference = None
    for fmt in args.formats.split(","):
        q = ["--quantize", fmt.removesuffix("-all")] + (["--quantize-all"]
                                                         if fmt.endswith("-all") else [])
        nll_sum = tokens = 0.0
        for w in windows:
            r = generate(args.kvgate, ["--model", args.model, "--prompt-ids",
                                       ",".join(map(str, w)), "--score-prompt"] + q)
            nll_sum += r["nll_sum"]
            tokens += len(w) - 1
        outs = [generate(args.kvgate, ["--model", args.model, "--prompt-ids",
                                       ",".join(map(str, p)), "--max-tokens", str(args.tokens),
                                       "--temperature", "0", "--ignore-eos"] + q)["token_ids"]
                for p in prompts]
        if reference is None:
            reference = outs
        same = prefix = total = 0
        for a, b in zip(reference, outs):
            n = min(len(a), len(b))
            same += sum(x == y for x, y in zip(a[:n], b[:n]))
            total += max(len(a), len(b))
            k = next((i for i in range(n) if a[i] != b[i]), n)
            prefix += k
        raw[fmt] = {"nll": nll_sum / tokens, "agreement": same / total,
                    "mean_common_prefix": prefix / len(outs)}
        rows.append((fmt, raw[fmt]["nll"], raw[fmt]["agreement"],
                     raw[fmt]["mean_common_prefix"]))
        print(f"{fmt}: NLL {raw[fmt]['nll']:.4f}, agreement {raw[fmt]['agreement']:.3f}",
              file=sys.stderr, flush=True)
    base = rows[0][1]
    table = ["| weights | held-out NLL (nats/token) | vs stored | greedy agreement | "
             "tokens before the first difference |",
             "|---|---:|---:|---:|---:|"]
    for fmt, nll, agree, prefix in rows:
        name = "as stored" if fmt == "none" else fmt.replace("-all", " --quantize-all")
        table.append(f"| {name} | {nll:.4f} | "
                     f"{nll - base:+.4f} | {agree:.3f} | {prefix:.1f} of {args.tokens} |")
    text = "\n".join(table)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(f"{args.model}: {args.windows} held-out windows of {args.context} tokens; "
                    f"{args.prompts} held-out prompts x {args.tokens} greedy tokens.\n\n"
                    + text + "\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(raw, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
