#!/usr/bin/env python3
"""Load generator for kvgate's OpenAI-compatible HTTP API, the twin of serving_bench (gRPC):
for each concurrency level, that many streams at once (`stream: true`, a fixed random token-id
prompt each, a fixed number of tokens, EOS ignored, greedy), `--rounds` waves per level; prints
one JSON line per level with throughput, time to first token and time per output token (p50,
p99), the same fields as `serving_bench --json`. Streams are read with the official `openai`
client (AsyncOpenAI, one event loop), so the numbers include what a Python user pays; with
`--client raw`, by a minimal asyncio HTTP/1.1 reader instead (no client library: what the
server's HTTP front end costs, with as little of the client's cost as Python allows).

    .venv/bin/python bench/serving/http_bench.py --base http://127.0.0.1:8000/v1 \\
        --concurrency 1,16,64 --tokens 64
"""

import argparse
import asyncio
import json
import random
import sys
import time


def percentile(values, p):
    """Nearest-rank percentile, as bench/serving/percentile.h."""
    if not values:
        return 0.0
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


async def stream(client, model, prompt, tokens):
    t0 = time.perf_counter()
    first = None
    n = 0
    s = await client.completions.create(model=model, prompt=prompt, max_tokens=tokens,
                                        temperature=0, stream=True,
                                        stream_options={"include_usage": True},
                                        extra_body={"ignore_eos": True})
    usage = None
    async for chunk in s:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    n = usage.completion_tokens if usage is not None else 0
    first = first or end
    return n, first - t0, (end - first) / max(1, n - 1)


async def raw_stream(base, key, model, prompt, tokens):
    """One SSE stream over a bare connection: counts `data:` events, reads usage at the end."""
    host, port = base.split("//", 1)[1].split("/", 1)[0].split(":")
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True},
                       "ignore_eos": True}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    writer.write((f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n{auth}"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                  "Connection: close\r\n\r\n").encode() + body)
    await writer.drain()
    first = None
    n = 0
    async for line in reader:
        if not line.startswith(b"data: "):
            continue
        if line.startswith(b"data: [DONE]"):
            break
        event = json.loads(line[6:])
        if event.get("choices") and event["choices"][0].get("text") and first is None:
            first = time.perf_counter()
        if event.get("usage"):
            n = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    writer.close()
    first = first or end
    return n, first - t0, (end - first) / max(1, n - 1)


async def main_async(args):
    import openai
    client = openai.AsyncOpenAI(base_url=args.base, api_key=args.api_key or "unused",
                                max_retries=0, timeout=600)
    models = await client.models.list()
    model = models.data[0].id
    one = (lambda p: stream(client, model, p, args.tokens)) if args.client == "openai" else (
        lambda p: raw_stream(args.base, args.api_key, model, p, args.tokens))
    vocab = args.vocab
    rng = random.Random(1)
    for level in args.concurrency:
        prompts = [[3 + rng.randrange(vocab - 3) for _ in range(args.prompt_len)]
                   for _ in range(level)]
        results = []
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            results += await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
        total = sum(r[0] for r in results)
        ttft = [r[1] * 1e3 for r in results]
        tpot = [r[2] * 1e3 for r in results]
        print(json.dumps({"client": args.client, "concurrency": level, "tokens": total,
                          "seconds": wall,
                          "tokens_per_s": total / wall,
                          "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
                          "tpot_ms_p50": percentile(tpot, 50),
                          "tpot_ms_p99": percentile(tpot, 99)}), flush=True)
    await client.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="http://HOST:PORT/v1")
    ap.add_argument("--api-key")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 16, 64])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=2048, help="the model's vocabulary size")
    ap.add_argument("--client", choices=["openai", "raw"], default="openai",
                    help="openai: the official client; raw: a bare asyncio HTTP reader")
    args = ap.parse_args()
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
