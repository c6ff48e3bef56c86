"""A Llama checkpoint with random weights in Hugging Face's layout, for speed benchmarks.

Shapes of a named model (TinyLlama-1.1B by default), weights drawn from N(0, 0.02) with a fixed
seed, saved as safetensors in bf16 with a Llama tokenizer copied beside them. Nothing is
downloaded: the tokenizer comes from ../shared/models (llama2-tokenizer, 32000 tokens).

  python bench/peers/make_random_llama.py OUT_DIR [--tokenizer DIR] [--shape tinyllama-1.1b]
"""

import argparse
import pathlib
import shutil
import sys

SHAPES = {
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0's config.json
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                           tie_word_embeddings=False),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", default=str(pathlib.Path(__file__).resolve().parents[2].parent
                                               / "shared/models/llama2-tokenizer"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = pathlib.Path(args.out)
    tok = pathlib.Path(args.tokenizer) / "tokenizer.model"
    if not tok.is_file():
        print(f"no tokenizer.model in {args.tokenizer}", file=sys.stderr)
        return 1
    config = LlamaConfig(**SHAPES[args.shape], torch_dtype="bfloat16", bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(args.seed)
    print(f"{args.shape}: building random weights", flush=True)
    with torch.no_grad():
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.shape}: {params / 1e9:.3f}B parameters -> {out}", flush=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="10GB")
    shutil.copy(tok, tmp / "tokenizer.model")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
