#!/usr/bin/env python3
"""Eviction quality: every KV policy at several budgets against `full`, through the kvgate CLI.

For each policy and budget (fractions of the context and fixed token counts) it measures
- retrieval accuracy (greedy exact match) on held-out passkey / multi-key / variable-tracking
  prompts of kvgate's corpus (models with a tokenizer.json: the default model), and
- the mean NLL of held-out text (natural text through the model's tokenizer.json, or, for a
  model without one such as stories260K, text sampled from the model itself with a held-out
  seed), scored with `kvgate generate --score-prompt` (chunked prefill under the policy),
with the measured eviction ratio and peak KV bytes that kvgate reports. Writes results.md
(markdown table), results.json and quality.png (quality against budget, one line per policy)
into --out, and prints the table.

    PYTHONPATH=training python3 eval/run_eval.py --model models/kvgate-default \\
        --out docs/eval/kvgate-default
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "training"))

POLICIES = ("full", "streaming", "h2o", "snapkv", "tova", "locret", "attention-gate")
WEIGHTS = {"locret": "locret.safetensors", "attention-gate": "attention_gate.safetensors"}


def kv_flags(policy: str, budget: int, chunk: int, weights_dir: str) -> list[str]:
    if policy == "full":
        return ["--prefill-chunk", str(chunk)]
    flags = ["--kv-policy", policy, "--kv-budget", str(budget), "--kv-chunk", str(chunk)]
    if policy == "snapkv":
        flags += ["--kv-window", str(max(1, min(32, budget // 2)))]
    if policy == "streaming":
        flags += ["--kv-sinks", str(min(4, budget - 1))]
    if policy in WEIGHTS:
        flags += ["--kv-weights", os.path.join(weights_dir, WEIGHTS[policy])]
    return flags


def run_kvgate(binary: str, args: list[str]) -> dict:
    proc = subprocess.run([binary, "generate", "--threads", "1", "--json"] + args,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"kvgate exited {proc.returncode}")
    return json.loads(proc.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    ap.add_argument("--weights-dir", help="directory with locret.safetensors and "
                    "attention_gate.safetensors (default: --model)")
    ap.add_argument("--kvgate", default=os.path.join(REPO, "build", "cli", "kvgate"))
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--context", type=int, default=0, help="prompt length (default: the "
                    "model's max_position_embeddings)")
    ap.add_argument("--fractions", default="0.05,0.1,0.25,0.5")
    ap.add_argument("--fixed", default="64,128", help="fixed token budgets")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--samples", type=int, default=20, help="retrieval prompts per task")
    ap.add_argument("--tasks", default="passkey,kv,vartrack", help="'' to skip retrieval")
    ap.add_argument("--nll-windows", type=int, default=8, help="held-out text windows")
    ap.add_argument("--jobs", type=int, default=2, help="kvgate processes at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of OUT/results.json for the policies not run now (add a "
                    "policy later, e.g. once its weights are trained)")
    args = ap.parse_args(argv)

    from kvgate_train.model import LlamaForCausalLM, load_config
    cfg = load_config(args.model)
    context = args.context or cfg.max_position_embeddings
    wdir = args.weights_dir or args.model
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            print(f"error: unknown policy {p!r}", file=sys.stderr)
            return 1
        if p in WEIGHTS and not os.path.exists(os.path.join(wdir, WEIGHTS[p])):
            print(f"error: {p} needs {os.path.join(wdir, WEIGHTS[p])}", file=sys.stderr)
            return 1
    budgets = sorted({max(8, int(round(float(f) * context))) for f in args.fractions.split(",")
                      if f} | {int(x) for x in args.fixed.split(",") if x})
    has_tok = os.path.exists(os.path.join(args.model, "tokenizer.json"))
    tasks = [t for t in args.tasks.split(",") if t] if has_tok else []

    # Held-out data.
    retrieval = []  # (task, prompt ids, answer text)
    nll_seqs = []
    if has_tok:
        from kvgate_train.data import CorpusBuilder, natural_text
        from kvgate_train.tokenizer import load_tokenizer
        tok, bos, eos = load_tokenizer(args.model)
        b = CorpusBuilder(tok, seed=args.seed, split="heldout", filler="text", bos_id=bos,
                          eos_id=eos)
        for t in tasks:
            for i in range(args.samples):
                s = b.sample(i, context - 8, t)
                retrieval.append((t, b.prompt_ids(s), s.answer.strip(),
                                  len(b.answer_ids(s)) + 1))
        ids = tok.encode(natural_text("heldout"), add_special_tokens=False).ids
        for w in range(args.nll_windows):
            nll_seqs.append([bos] + ids[w * (context - 1):(w + 1) * (context - 1)])
    else:
        from kvgate_train.features import SequenceSource
        model = LlamaForCausalLM.from_pretrained(args.model).eval()
        src = SequenceSource(model, args.model, "sample", context, "heldout", args.seed)
        nll_seqs = [src.get(i).ids for i in range(args.nll_windows)]

    configs = [("full", context)] + [(p, bud) for p in policies if p != "full" for bud in budgets]
    jobs = []
    for policy, budget in configs:
        flags = kv_flags(policy, budget, args.chunk, wdir)
        for idx, (task, prompt, answer, max_new) in enumerate(retrieval):
            jobs.append(("ret", policy, budget, task, idx, answer,
                         ["--model", args.model, "--prompt-ids", ",".join(map(str, prompt)),
                          "--max-tokens", str(max_new), "--temperature", "0"] + flags))
        for idx, seq in enumerate(nll_seqs):
            jobs.append(("nll", policy, budget, "nll", idx, None,
                         ["--model", args.model, "--prompt-ids", ",".join(map(str, seq)),
                          "--score-prompt"] + flags))
    print(f"{len(configs)} configurations, {len(jobs)} kvgate runs "
          f"({len(retrieval)} retrieval prompts, {len(nll_seqs)} text windows of up to "
          f"{context} tokens)", file=sys.stderr, flush=True)

    results: dict = {}
    t0 = time.time()
    done = 0

    def work(job):
        kind, policy, budget, task, idx, answer, cmd = job
        try:
            return job, run_kvgate(args.kvgate, cmd), None
        except Exception as e:  # noqa: BLE001 - reported per configuration
            return job, None, str(e)

    with cf.ThreadPoolExecutor(max_workers=args.jobs) as ex:
        for job, out, err in ex.map(work, jobs):
            kind, policy, budget, task, idx, answer, _ = job
            r = results.setdefault((policy, budget), {"right": {}, "count": {}, "nll": [],
                                                      "ratio": [], "peak": 0, "errors": []})
            done += 1
            if err is not None:
                r["errors"].append(err)
                continue
            r["ratio"].append(out["kv"]["eviction_ratio"])
            r["peak"] = max(r["peak"], out["kv"]["peak_kv_bytes"])
            if kind == "ret":
                ok = out["text"].strip() == answer
                r["right"][task] = r["right"].get(task, 0) + int(ok)
                r["count"][task] = r["count"].get(task, 0) + 1
            else:
                r["nll"].append(out["nll_mean"])
            if done % 200 == 0 or done == len(jobs):
                el = time.time() - t0
                print(f"  {done}/{len(jobs)} runs, {el:.0f} s, ETA "
                      f"{el / done * (len(jobs) - done):.0f} s", file=sys.stderr, flush=True)

    rows = []
    for policy, budget in configs:
        r = results[(policy, budget)]
        acc = {t: r["right"].get(t, 0) / r["count"][t] for t in tasks if r["count"].get(t)}
        rows.append({
            "policy": policy, "budget": budget, "budget_fraction": budget / context,
            "accuracy": acc,
            "accuracy_mean": sum(acc.values()) / len(acc) if acc else None,
            "nll": sum(r["nll"]) / len(r["nll"]) if r["nll"] else None,
            "eviction_ratio": sum(r["ratio"]) / len(r["ratio"]) if r["ratio"] else None,
            "peak_kv_bytes": r["peak"], "errors": r["errors"][:3],
            "n_errors": len(r["errors"])})

    os.makedirs(args.out, exist_ok=True)
    cmd = " ".join(["PYTHONPATH=training", "python3", "eval/run_eval.py"] +
                   (argv if argv is not None else sys.argv[1:]))
    commands = [cmd]
    old_path = os.path.join(args.out, "results.json")
    if args.merge and os.path.exists(old_path):
        with open(old_path) as f:
            old = json.load(f)
        ran = {r["policy"] for r in rows}
        kept = [r for r in old["rows"] if r["policy"] not in ran]
        rows = sorted(kept + rows, key=lambda r: (POLICIES.index(r["policy"]), r["budget"]))
        commands = old.get("commands", [old.get("command")]) + [cmd]
    lines = [f"Model `{args.model}`, context {context} tokens, chunk {args.chunk}, "
             f"{args.samples} held-out prompts per task, {len(nll_seqs)} held-out text windows. "
             "Command" + ("s" if len(commands) > 1 else "") + ": " +
             "; ".join(f"`{c}`" for c in commands), ""]
    head = "| policy | budget (tokens) | budget / context |"
    head += "".join(f" {t} acc |" for t in tasks) + (" mean acc |" if tasks else "")
    head += " mean NLL | measured eviction ratio | peak KV bytes |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        cells = [row["policy"], str(row["budget"]) if row["policy"] != "full" else "all",
                 f"{row['budget_fraction']:.0%}" if row["policy"] != "full" else "100%"]
        cells += [f"{row['accuracy'].get(t, float('nan')):.0%}" for t in tasks]
        if tasks:
            cells.append(f"{row['accuracy_mean']:.0%}" if row["accuracy_mean"] is not None
                         else "-")
        cells.append(f"{row['nll']:.4f}" if row["nll"] is not None else "-")
        cells.append(f"{row['eviction_ratio']:.3f}" if row["eviction_ratio"] is not None
                     else "-")
        cells.append(f"{row['peak_kv_bytes']:,}")
        if row["n_errors"]:
            cells[-1] += f" ({row['n_errors']} runs failed: {row['errors'][0][:80]})"
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"model": args.model, "context": context, "command": cmd,
                   "commands": commands, "rows": rows}, f, indent=1)
    plot(rows, tasks, context, os.path.join(args.out, "quality.png"), args.model)
    return 0


def plot(rows, tasks, context, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = (["accuracy_mean"] if tasks else []) + ["nll"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4))
    if len(panels) == 1:
        axes = [axes]
    full = next(r for r in rows if r["policy"] == "full")
    for ax, key in zip(axes, panels):
        for policy in sorted({r["policy"] for r in rows} - {"full"}):
            pts = sorted((r["budget_fraction"], r[key]) for r in rows
                         if r["policy"] == policy and r[key] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        if full[key] is not None:
            ax.axhline(full[key], color="black", linestyle="--", label="full")
        ax.set_xscale("log")
        ax.set_xlabel(f"budget / context ({context} tokens)")
        ax.set_ylabel("retrieval accuracy (mean over tasks)" if key == "accuracy_mean"
                      else "held-out mean NLL (nats/token)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"KV eviction quality: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
