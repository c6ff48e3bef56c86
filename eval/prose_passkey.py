#!/usr/bin/env python3
"""Pass-key retrieval on prose the eviction weights were not trained on, through the kvgate CLI.

The test a new user runs first: hide a pass key in ordinary English text at a chosen depth, put
decoy numbers right around it, ask for it, and see whether an evicting cache still answers.
Filler sources (kvgate_train/prose.py): `kjv` (held-out KJV chapters, the text the default
model and the shipped weights were trained on), and `devil` (Bierce's The Devil's Dictionary)
and `licenses` (/usr/share/common-licenses), which no kvgate trainer reads. Depths 0% to 95%
of the filler; two decoys ("The ticket said 48213." and the like, wording no trainer uses) just
before and after the needle. Every configuration (policy, weights, budget) answers every
prompt with greedy decoding; exact match. Writes results.md and results.json into --out.

    PYTHONPATH=training python3 eval/prose_passkey.py --model models/kvgate-default \\
        --out docs/eval/prose-passkey \\
        --gates new=/tmp/attention_gate.safetensors      # compare other gate files
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "training"))

EVAL_DECOYS = ("The ticket said {n}.", "Order number {n} shipped today.",
               "There were {n} of them in the hall.", "Page {n} was missing.")
NEEDLE = "The pass key is {n}. Remember it. {n} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def filler_units(source: str) -> list[str]:
    from kvgate_train.data import load_chapters, split_chapters
    from kvgate_train.prose import load_prose
    if source == "kjv":
        chapters = split_chapters(load_chapters(), "heldout")
    else:
        chapters = load_prose(source)  # never read by a trainer: all of it is held out
    return [u for c in chapters for u in c]


def build_prompt(tok, bos: int, units: list[str], lens: list[int], depth: float, n_tokens: int,
                 decoys: int, rng: random.Random) -> tuple[list[int], str]:
    """[BOS] filler with the needle (and decoys around it) at `depth`, question -> (ids, key)."""
    key = str(rng.randrange(10000, 100000))
    others = []
    while len(others) < decoys:
        d = str(rng.randrange(10000, 100000))
        if d != key and d not in others:
            others.append(d)
    group = [rng.choice(EVAL_DECOYS).format(n=d) for d in others[:decoys // 2]]
    group += [NEEDLE.format(n=key)]
    group += [rng.choice(EVAL_DECOYS).format(n=d) for d in others[decoys // 2:]]
    overhead = sum(len(tok.encode(" " + g, add_special_tokens=False).ids) for g in group)
    overhead += len(tok.encode("\n" + QUESTION, add_special_tokens=False).ids) + 1
    budget = n_tokens - overhead
    while True:
        start = rng.randrange(len(units))
        chosen, total, i = [], 0, start
        while total + lens[i % len(units)] <= budget:
            chosen.append(units[i % len(units)])
            total += lens[i % len(units)]
            i += 1
        # The needle group goes after the unit where the running length passes depth * total.
        at, run = 0, 0
        while at < len(chosen) and run + lens[(start + at) % len(units)] <= depth * total:
            run += lens[(start + at) % len(units)]
            at += 1
        text = " ".join(chosen[:at] + group + chosen[at:]) + "\n" + QUESTION
        ids = [bos] + tok.encode(text, add_special_tokens=False).ids
        if len(ids) <= n_tokens:
            return ids, key
        budget -= len(ids) - n_tokens + 4


def kv_flags(policy: str, budget: int, chunk: int, weights: str | None) -> list[str]:
    if policy == "full":
        return ["--prefill-chunk", str(chunk)]
    flags = ["--kv-policy", policy, "--kv-budget", str(budget), "--kv-chunk", str(chunk)]
    if policy == "snapkv":
        flags += ["--kv-window", str(max(1, min(32, budget // 2)))]
    if weights:
        flags += ["--kv-weights", weights]
    return flags


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(REPO, "models", "kvgate-default"))
    ap.add_argument("--kvgate", default=os.path.join(REPO, "build", "cli", "kvgate"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--fillers", default="kjv,devil,licenses")
    ap.add_argument("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95")
    ap.add_argument("--samples", type=int, default=2, help="prompts per filler and depth")
    ap.add_argument("--decoys", type=int, default=2)
    ap.add_argument("--context", type=int, default=2040, help="prompt tokens")
    ap.add_argument("--budgets", default="128,205")
    ap.add_argument("--policies", default="full,snapkv,expected-attention,locret,attention-gate")
    ap.add_argument("--gates", action="append", default=[],
                    help="NAME=PATH: another attention-gate file to compare (repeatable)")
    ap.add_argument("--heads", action="append", default=[],
                    help="NAME=PATH: another locret file to compare (repeatable)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of OUT/results.json for configurations not run now")
    args = ap.parse_args(argv)

    from kvgate_train.tokenizer import load_tokenizer
    tok, bos, _ = load_tokenizer(args.model)
    depths = [float(d) for d in args.depths.split(",")]
    prompts = []  # (filler, depth, ids, key)
    for src in args.fillers.split(","):
        units = filler_units(src)
        lens = [len(e.ids) for e in tok.encode_batch([" " + u for u in units],
                                                     add_special_tokens=False)]
        for depth in depths:
            for s in range(args.samples):
                rng = random.Random(f"prose-passkey/{args.seed}/{src}/{depth}/{s}")
                ids, key = build_prompt(tok, bos, units, lens, depth, args.context,
                                        args.decoys, rng)
                prompts.append((src, depth, ids, key))

    weights = {"locret": os.path.join(args.model, "locret.safetensors"),
               "attention-gate": os.path.join(args.model, "attention_gate.safetensors")}
    configs = []  # (label, policy, budget, weights)
    for p in [p for p in args.policies.split(",") if p]:
        if p == "full":
            configs.append(("full", "full", 0, None))
            continue
        for b in args.budgets.split(","):
            configs.append((p, p, int(b), weights.get(p)))
    for kind, items in (("attention-gate", args.gates), ("locret", args.heads)):
        for item in items:
            name, _, path = item.partition("=")
            if not path or not os.path.exists(path):
                print(f"error: {item!r}: expected NAME=PATH of an existing file", file=sys.stderr)
                return 1
            for b in args.budgets.split(","):
                configs.append((f"{kind} ({name})", kind, int(b), path))

    jobs = [(c, p) for c in configs for p in prompts]
    print(f"{len(prompts)} prompts x {len(configs)} configurations = {len(jobs)} kvgate runs",
          file=sys.stderr, flush=True)

    def work(job):
        (label, policy, budget, w), (src, depth, ids, key) = job
        max_new = len(tok.encode(" " + key, add_special_tokens=False).ids) + 1
        cmd = [args.kvgate, "generate", "--threads", "1", "--json", "--model", args.model,
               "--prompt-ids", ",".join(map(str, ids)), "--max-tokens", str(max_new),
               "--temperature", "0"] + kv_flags(policy, budget, args.chunk, w)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return job, None, proc.stderr.strip()[-200:]
        return job, json.loads(proc.stdout), None

    cells: dict = {}
    t0, done = time.time(), 0
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as ex:
        for job, out, err in ex.map(work, jobs):
            (label, policy, budget, w), (src, depth, ids, key) = job
            c = cells.setdefault((label, budget), {"right": {}, "n": {}, "ratio": [],
                                                   "errors": []})
            done += 1
            if err is not None:
                c["errors"].append(err)
                continue
            ok = out["text"].strip().startswith(key)
            for k in (src, (src, depth)):
                c["right"][k] = c["right"].get(k, 0) + int(ok)
                c["n"][k] = c["n"].get(k, 0) + 1
            c["ratio"].append(out["kv"]["eviction_ratio"])
            if done % 100 == 0 or done == len(jobs):
                el = time.time() - t0
                print(f"  {done}/{len(jobs)} runs, {el:.0f} s, ETA "
                      f"{el / done * (len(jobs) - done):.0f} s", file=sys.stderr, flush=True)

    fillers = args.fillers.split(",")
    rows = []
    for label, policy, budget, w in configs:
        c = cells[(label, budget)]
        acc = {f: c["right"].get(f, 0) / c["n"][f] for f in fillers if c["n"].get(f)}
        by_depth = {f"{f}@{d:g}": c["right"].get((f, d), 0) / c["n"][(f, d)]
                    for f in fillers for d in depths if c["n"].get((f, d))}
        rows.append({"config": label, "policy": policy, "budget": budget, "weights": w,
                     "accuracy": acc, "accuracy_by_depth": by_depth,
                     "eviction_ratio": sum(c["ratio"]) / len(c["ratio"]) if c["ratio"] else None,
                     "n_errors": len(c["errors"]), "errors": c["errors"][:3]})

    cmd = " ".join(["PYTHONPATH=training", "python3", "eval/prose_passkey.py"] +
                   (argv if argv is not None else sys.argv[1:]))
    commands = [cmd]
    old_path = os.path.join(args.out, "results.json")
    if args.merge and os.path.exists(old_path):
        with open(old_path) as f:
            old = json.load(f)
        if old["fillers"] != fillers or old["depths"] != depths:
            print("error: --merge needs the same --fillers and --depths as the rows in "
                  f"{old_path}", file=sys.stderr)
            return 1
        ran = {(r["config"], r["budget"]) for r in rows}
        rows = [r for r in old["rows"] if (r["config"], r["budget"]) not in ran] + rows
        commands = old["commands"] + [cmd]
    table = render(rows, fillers, depths, args, commands)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(old_path, "w") as f:
        json.dump({"model": args.model, "commands": commands, "depths": depths,
                   "fillers": fillers, "rows": rows}, f, indent=1)
    return 0


def render(rows, fillers, depths, args, commands) -> str:
    lines = [f"Model `{args.model}`, {args.context}-token prompts, {args.samples} per filler and "
             f"depth, {args.decoys} decoy numbers around the needle, chunk {args.chunk}. "
             "Command" + ("s" if len(commands) > 1 else "") + ": " +
             "; ".join(f"`{c}`" for c in commands), ""]
    head = "| configuration | budget (tokens) |" + "".join(f" {f} |" for f in fillers)
    head += " mean | measured eviction |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        accs = [r["accuracy"].get(f) for f in fillers]
        cells = [r["config"], str(r["budget"]) if r["budget"] else "all"]
        cells += [f"{a:.0%}" if a is not None else "-" for a in accs]
        known = [a for a in accs if a is not None]
        cells.append(f"{sum(known) / len(known):.0%}" if known else "-")
        cells.append(f"{r['eviction_ratio']:.3f}" if r["eviction_ratio"] is not None else "-")
        if r["n_errors"]:
            cells[-1] += f" ({r['n_errors']} runs failed: {r['errors'][0][:80]})"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracy by depth of the needle (all fillers together):", ""]
    head = "| configuration | budget |" + "".join(f" {d:.0%} |" for d in depths)
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        vals = []
        for d in depths:
            v = [r["accuracy_by_depth"].get(f"{f}@{d:g}") for f in fillers]
            v = [x for x in v if x is not None]
            vals.append(f"{sum(v) / len(v):.0%}" if v else "-")
        lines.append(f"| {r['config']} | {r['budget'] or 'all'} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
