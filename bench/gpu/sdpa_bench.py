#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention on the shapes of attention_decode_bench: one sequence,
one new token, 32 query heads over 8 KV heads (GQA), head_dim 128, float32 KV, contexts of 4K,
32K and 128K tokens; the achieved bandwidth (K and V read once) and its share of a large
device-to-device copy measured in the same run. The peer our decode kernel is compared with.

    python3 bench/gpu/sdpa_bench.py [--iters 50]
"""
import argparse
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("sdpa_bench: PyTorch is not installed: nothing to compare with")
    sys.exit(0)


def timed(fn, iters):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters  # ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("sdpa_bench: no CUDA GPU found: nothing to measure")
        return
    dev = torch.device("cuda")
    src = torch.empty(1 << 28, dtype=torch.float32, device=dev)  # 1 GiB
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), args.iters)
    copy_gbs = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    del src, dst
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(f"device-to-device copy of 1 GiB: {ms:.3f} ms, {copy_gbs:.0f} GB/s (read + write)\n")
    print("| context | KV read per call (MiB) | SDPA time (us) | GB/s | % of copy |")
    print("|--------:|-----------------------:|---------------:|-----:|----------:|")
    heads, kv_heads, d = 32, 8, 128
    for ctx in (4096, 32768, 131072):
        q = torch.randn(1, heads, 1, d, device=dev)
        k = torch.randn(1, kv_heads, ctx, d, device=dev)
        v = torch.randn(1, kv_heads, ctx, d, device=dev)
        # GQA: enable_gqa where this torch has it, else the KV heads repeated (a view would not
        # do: SDPA needs equal head counts), which the timing then includes.
        try:
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            run = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        except TypeError:
            kr = k.repeat_interleave(heads // kv_heads, dim=1)
            vr = v.repeat_interleave(heads // kv_heads, dim=1)
            run = lambda: F.scaled_dot_product_attention(q, kr, vr)
        ms = timed(run, args.iters)
        read = 2 * kv_heads * ctx * d * 4
        gbs = read / (ms * 1e-3) / 1e9
        print(f"| {ctx // 1024}K | {read / 2**20:.0f} | {ms * 1e3:.1f} | {gbs:.0f} | "
              f"{100 * gbs / copy_gbs:.1f}% |")


if __name__ == "__main__":
    main()
