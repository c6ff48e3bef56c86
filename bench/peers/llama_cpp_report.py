"""Medians of interleaved kvgate / llama.cpp rounds (bench/peers/llama_cpp.sh), as a table.

Reads the JSON lines the rounds left in RESULTS_DIR: kvgate-<config>-<round>.json (engine_bench
--json) and llama-<config>-<round>.jsonl (llama-bench -o jsonl); prints markdown.
"""

import json
import pathlib
import statistics
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().startswith("{")]


def main() -> int:
    results = pathlib.Path(sys.argv[1])
    configs = [c.split("=", 2) for c in sys.argv[2:]]  # label=weights=config
    print("| model | weights | test | kvgate tok/s | llama.cpp tok/s | kvgate / llama.cpp |"
          " per-round ratios |")
    print("|---|---|---|---:|---:|---:|---|")
    bound_rows = []
    for label, weights, config in configs:
        kv = {}
        ll = {}
        copy = []
        gb = None
        rounds = sorted(results.glob(f"kvgate-{config}-*.json"))
        for path in rounds:
            r = path.stem.rsplit("-", 1)[1]
            rows = load(path)
            if not rows:
                continue
            row = rows[0]
            gb = row["weight_gb_per_token"]
            copy.append(row["copy_gbs"])
            for p, tps in row["prefill_tps"].items():
                kv.setdefault(f"pp{p}", {})[r] = tps
            kv.setdefault(f"tg{row['decode_tokens']}", {})[r] = row["decode_tps"]
            lpath = results / f"llama-{config}-{r}.jsonl"
            for t in load(lpath) if lpath.exists() else []:
                name = f"pp{t['n_prompt']}" if t["n_gen"] == 0 else f"tg{t['n_gen']}"
                ll.setdefault(name, {})[r] = t["avg_ts"]
        for test in sorted(kv, key=lambda t: (t[:2] != "pp", int(t[2:]))):
            both = sorted(set(kv[test]) & set(ll.get(test, {})))
            if not both:
                continue
            a = statistics.median(kv[test][r] for r in both)
            b = statistics.median(ll[test][r] for r in both)
            ratios = " ".join(f"{kv[test][r] / ll[test][r]:.2f}" for r in both)
            print(f"| {label} | {weights} | {test} | {a:.1f} | {b:.1f} | **{a / b:.2f}** |"
                  f" {ratios} |")
            if test.startswith("tg") and gb:
                bw = statistics.median(copy)
                bound_rows.append((label, weights, gb, bw, a * gb / bw, b * gb / bw))
    if bound_rows:
        print()
        print("Decode as a fraction of the copy-bandwidth bound (weight bytes read per token x"
              " tok/s / copy GB/s measured by engine_bench in the same rounds; both engines read"
              " the same bytes: the same tensors in the same formats):")
        print()
        print("| model | weights | GB/token | copy GB/s (median) | kvgate | llama.cpp |")
        print("|---|---|---:|---:|---:|---:|")
        for label, weights, gb, bw, a, b in bound_rows:
            print(f"| {label} | {weights} | {gb:.4f} | {bw:.1f} | {100 * a:.0f}% |"
                  f" {100 * b:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
