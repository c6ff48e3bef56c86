#!/usr/bin/env python3
"""A kvpress-style benchmark: RULER-style tasks at the default model's context, every policy,
allocation and prefill mode, at compression 25 to 93.75%, the question kept out of compression.

As NVIDIA's kvpress leaderboard measures it: the context is compressed to (1 - ratio) of its
tokens per (layer, KV head) (`--kv-budget`), the question is prefilled after compression and
never evicted (`--kv-protected-tail`), the answer is decoded greedily. Tasks (held-out split,
KJV prose as filler, needles at uniform random depths):

- passkey, kv (multi-key: 4 keys, one asked), vartrack (variable tracking: a chain of 4
  assignments among decoys): the formats the default model was trained on;
- mq (multi-query: the same 4-key context, every key asked, one question at a time, as kvpress
  asks several questions of one compressed context); score: the share answered;
- kv8 (multi-key with 8 keys; the model was trained with 4), mv (multi-value: one key given 4
  values; "What are all the values of K?") and cwe (common-word extraction, RULER's: the 10
  words repeated most in a numbered list): what the model was not trained on, where the full
  cache's own accuracy is the ceiling (the 3.67M-parameter default model manages kv8, not mv
  or cwe); mv and cwe score the recall of the wanted items.

Accuracy relative to the full cache is averaged over the tasks where the full cache scores
above zero. Every run reports kvgate's measured eviction ratio (over every token of the
request), which the plot uses.

    PYTHONPATH=training python3 eval/ruler_bench.py --kvgate build/cli/kvgate \\
        --out docs/eval/ruler
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

RATIOS = (0.25, 0.5, 0.75, 0.875, 0.9, 0.9375)
POLICIES = ("streaming", "h2o", "snapkv", "tova", "expected-attention", "locret",
            "attention-gate")
LEARNED = ("locret", "attention-gate")
ALLOCATIONS = ("uniform", "pyramid", "adaptive")
PREFILLS = ("chunked", "whole")
WEIGHTS = {"locret": "locret.safetensors", "attention-gate": "attention_gate.safetensors"}
TASKS = ("passkey", "kv", "kv8", "mq", "mv", "vartrack", "cwe")


class Task:
    """One prompt: its context, its questions and their answers, and how an answer scores."""

    def __init__(self, kind, context, questions, answers, recall=False):
        self.kind, self.context, self.questions, self.answers = kind, context, questions, answers
        self.recall = recall  # score the share of the answer's words found (mv, cwe)


def build_tasks(model_dir, context, samples, seed, kinds):
    from kvgate_train.data import KEY_WORDS, CorpusBuilder, interleave
    from kvgate_train.tokenizer import load_tokenizer

    tok, bos, eos = load_tokenizer(model_dir)
    b = CorpusBuilder(tok, seed=seed, split="heldout", filler="text", bos_id=bos, eos_id=eos)
    b8 = CorpusBuilder(tok, seed=seed, split="heldout", filler="text", bos_id=bos, eos_id=eos,
                       kv_pairs=8)

    def ids(text):
        return tok.encode(text, add_special_tokens=False).ids

    def compose(rng, needles, questions, answers, budget_tokens):
        """Filler with the needles at random depths, fitted to the context length."""
        need = sum(len(ids(" " + n)) for n in needles)
        q_max = max(len(ids("\n" + q)) for q in questions)
        a_max = max(len(ids(a)) for a in answers)
        room = budget_tokens - need - q_max - a_max - 4
        for _ in range(12):
            units = b._filler(rng, max(room, 0), False) if room > 0 else []
            ctx = [bos] + ids(" ".join(interleave(units, needles, rng)))
            if len(ctx) + q_max + a_max <= budget_tokens:
                return ctx, [ids("\n" + q) for q in questions]
            room -= max(8, len(ctx) + q_max + a_max - budget_tokens + 4)
        raise ValueError("needles do not fit the context")

    tasks = []
    for kind in kinds:
        for i in range(samples):
            rng = random.Random(f"kvgate-ruler/{seed}/{kind}/{i}/{context}")
            if kind in ("passkey", "kv", "kv8", "vartrack"):
                src = b8 if kind == "kv8" else b
                s = src.sample(i, context - 8, "kv" if kind == "kv8" else kind)
                p = src.prompt_ids(s)
                q = len(ids("\n" + s.prompt.rsplit("\n", 1)[1]))
                tasks.append(Task(kind, p[:-q], [p[-q:]], [s.answer.strip()]))
            elif kind == "mq":
                keys = rng.sample(KEY_WORDS, 4)
                vals = rng.sample(range(10000, 100000), 4)
                needles = [f"The value of {k} is {v}." for k, v in zip(keys, vals)]
                qs = [f"What is the value of {k}? The value of {k} is" for k in keys]
                ctx, qids = compose(rng, needles, qs, [f" {v}" for v in vals], context)
                tasks.append(Task(kind, ctx, qids, [str(v) for v in vals]))
            elif kind == "mv":
                key = rng.choice(KEY_WORDS)
                vals = rng.sample(range(10000, 100000), 4)
                needles = [f"One of the values of {key} is {v}." for v in vals]
                q = f"What are all the values of {key}? The values of {key} are"
                ans = " ".join(str(v) for v in vals)
                ctx, qids = compose(rng, needles, [q], [" " + ans], context)
                tasks.append(Task(kind, ctx, qids, [ans], recall=True))
            elif kind == "cwe":
                words = list(KEY_WORDS)
                rng.shuffle(words)
                common, rare = words[:10], words[10:]
                items = [w for w in common for _ in range(24)] + [w for w in rare for _ in range(3)]
                rng.shuffle(items)
                q = ("What are the 10 most common words in the above list? Answer: The top 10 "
                     "words appearing most often in the list are:")
                while True:
                    text = " ".join(f"{j + 1}. {w}" for j, w in enumerate(items))
                    ctx = [bos] + ids(text)
                    if len(ctx) + len(ids("\n" + q)) + 40 <= context:
                        break
                    items = items[:-10]
                tasks.append(Task(kind, ctx, [ids("\n" + q)], [" ".join(common)], recall=True))
    return tasks, tok


def score(task, q, text):
    want = task.answers[q]
    if task.recall:
        got = set(text.replace(",", " ").replace(".", " ").split())
        words = want.split()
        return sum(w in got for w in words) / len(words)
    return float(text.strip() == want.strip())


def configs(policies, ratios):
    out = [("full", "uniform", "chunked", 0.0)]
    for policy in policies:
        for alloc in ALLOCATIONS:
            if policy == "streaming" and alloc == "adaptive":
                continue  # no scores to share by
            for prefill in PREFILLS:
                for ratio in ratios:
                    out.append((policy, alloc, prefill, ratio))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(REPO, "models", "kvgate-default"))
    ap.add_argument("--kvgate", default=os.path.join(REPO, "build", "cli", "kvgate"))
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "eval", "ruler"))
    ap.add_argument("--context", type=int, default=2040, help="tokens of context + question")
    ap.add_argument("--samples", type=int, default=3, help="prompts per task")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)

    tasks, tok = build_tasks(args.model, args.context, args.samples, args.seed,
                             args.tasks.split(","))
    ratios = [float(r) for r in args.ratios.split(",")]
    grid = configs([p for p in args.policies.split(",") if p], ratios)
    jobs = []
    for cfg in grid:
        policy, alloc, prefill, ratio = cfg
        for ti, t in enumerate(tasks):
            for qi, q in enumerate(t.questions):
                budget = max(1, int(len(t.context) * (1 - ratio)))
                max_new = len(tok.encode(" " + t.answers[qi], add_special_tokens=False).ids) + 2
                cmd = [args.kvgate, "generate", "--model", args.model, "--threads", "1", "--json",
                       "--prompt-ids", ",".join(map(str, t.context + q)), "--max-tokens",
                       str(max_new), "--temperature", "0"]
                if policy == "full":
                    cmd += ["--prefill-chunk", str(args.chunk)]
                else:
                    cmd += ["--kv-policy", policy, "--kv-budget", str(budget), "--kv-chunk",
                            str(args.chunk), "--kv-allocation", alloc, "--kv-prefill", prefill,
                            "--kv-protected-tail", str(len(q))]
                    if policy in WEIGHTS:
                        cmd += ["--kv-weights", os.path.join(args.model, WEIGHTS[policy])]
                jobs.append((cfg, ti, qi, cmd))
    print(f"{len(grid)} configurations, {len(tasks)} prompts, {len(jobs)} kvgate runs",
          file=sys.stderr, flush=True)

    def work(job):
        cfg, ti, qi, cmd = job
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return job, None, proc.stderr.strip()[-300:]
        return job, json.loads(proc.stdout), None

    acc: dict = {}
    t0, done = time.time(), 0
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as ex:
        for job, out, err in ex.map(work, jobs):
            cfg, ti, qi, _ = job
            r = acc.setdefault(cfg, {"score": {}, "count": {}, "ratio": [], "errors": []})
            done += 1
            if err is not None:
                r["errors"].append(err)
            else:
                kind = tasks[ti].kind
                r["score"][kind] = r["score"].get(kind, 0.0) + score(tasks[ti], qi, out["text"])
                r["count"][kind] = r["count"].get(kind, 0) + 1
                r["ratio"].append(out["kv"]["eviction_ratio"])
            if done % 200 == 0 or done == len(jobs):
                print(f"  {done}/{len(jobs)} runs, {time.time() - t0:.0f} s", file=sys.stderr,
                      flush=True)

    kinds = args.tasks.split(",")
    full = acc[grid[0]]
    full_acc = {k: full["score"].get(k, 0.0) / max(1, full["count"].get(k, 0)) for k in kinds}
    ceiling = [k for k in kinds if full_acc[k] > 0]
    rows = []
    for cfg in grid:
        r = acc[cfg]
        per = {k: r["score"].get(k, 0.0) / max(1, r["count"].get(k, 0)) for k in kinds}
        rel = (sum(min(per[k] / full_acc[k], 1.5) for k in ceiling) / len(ceiling)
               if ceiling else 0.0)
        rows.append({"policy": cfg[0], "allocation": cfg[1], "prefill": cfg[2],
                     "compression": cfg[3], "accuracy": per,
                     "mean_accuracy": sum(per.values()) / len(kinds), "relative": rel,
                     "eviction_ratio": sum(r["ratio"]) / max(1, len(r["ratio"])),
                     "errors": r["errors"][:3]})
    os.makedirs(args.out, exist_ok=True)
    result = {"model": os.path.relpath(args.model, REPO), "context": args.context,
              "samples_per_task": args.samples, "tasks": kinds, "full_accuracy": full_acc,
              "relative_over": ceiling, "rows": rows}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = report(result, ratios)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    plot(result, os.path.join(args.out, "accuracy.png"))
    return 0


def report(result, ratios):
    kinds = result["tasks"]
    lines = [f"Model {result['model']}, {result['context']} tokens, {result['samples_per_task']} "
             f"prompts per task. Full cache: " +
             ", ".join(f"{k} {v:.2f}" for k, v in result["full_accuracy"].items()) +
             f". Relative accuracy averages over {', '.join(result['relative_over'])} (the full "
             "cache above zero).", "",
             "### Accuracy relative to the full cache, by compression", "",
             "| policy | allocation | prefill | " + " | ".join(f"{r:.2%}" for r in ratios) +
             " | measured eviction at the last |",
             "|---|---|---|" + "---|" * len(ratios) + "---|"]
    by = {}
    for r in result["rows"][1:]:
        by.setdefault((r["policy"], r["allocation"], r["prefill"]), {})[r["compression"]] = r
    for key, cells in by.items():
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " +
                     " | ".join(f"{cells[c]['relative']:.2f}" if c in cells else "-"
                                for c in ratios) +
                     f" | {cells[ratios[-1]]['eviction_ratio']:.3f} |")
    lines += ["", "### Accuracy per task at each configuration's highest compression", "",
              "| policy | allocation | prefill | " + " | ".join(kinds) + " |",
              "|---|---|---|" + "---|" * len(kinds)]
    for key, cells in by.items():
        r = cells[ratios[-1]]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " +
                     " | ".join(f"{r['accuracy'][k]:.2f}" for k in kinds) + " |")
    # The goal at 90%.
    at90 = [r for r in result["rows"][1:] if abs(r["compression"] - 0.9) < 1e-9]
    if at90:
        best = max(at90, key=lambda r: r["relative"])
        lines += ["", f"Best at 90% compression: {best['policy']} / {best['allocation']} / "
                  f"{best['prefill']}, {best['relative']:.1%} of the full cache's accuracy "
                  f"(measured eviction {best['eviction_ratio']:.3f})."]
    return "\n".join(lines) + "\n"


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    best = {}
    for r in result["rows"][1:]:
        key = (r["policy"], r["compression"])
        if key not in best or r["relative"] > best[key]["relative"]:
            best[key] = r
    for policy in dict.fromkeys(r["policy"] for r in result["rows"][1:]):
        pts = sorted((r["eviction_ratio"], r["relative"]) for (p, _), r in best.items()
                     if p == policy)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle="-" if policy in LEARNED else "--", label=policy)
    ax.axhline(0.95, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("measured eviction ratio")
    ax.set_ylabel("accuracy relative to the full cache (best allocation and prefill)")
    ax.set_title(f"{result['model']}: RULER-style tasks at {result['context']} tokens")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
