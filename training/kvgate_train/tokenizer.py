"""Trains kvgate's byte-level BPE tokenizer with the `tokenizers` library.

Llama-3-style pre-tokenization (a Split on Llama 3's regex, then ByteLevel without its own
regex), except that digits are split one by one (`\\p{N}` instead of `\\p{N}{1,3}`): every
number is a sequence of digit tokens, which makes copying a number from far back a
token-by-token lookup that a tiny model learns quickly. BOS `<|begin_of_text|>` (id 0) and EOS
`<|end_of_text|>` (id 1); the post-processor prepends BOS, as Llama 3's does.

Writes tokenizer.json, tokenizer_config.json (add_bos_token true) and generation_config.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Optional

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)])
    return tok


def save_tokenizer_dir(tok: Tokenizer, out_dir: str, model_max_length: int = 2048) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": BOS,
            "eos_token": EOS,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
        }, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, f, indent=2)
        f.write("\n")


def load_tokenizer(path: str) -> tuple[Tokenizer, int, int]:
    """(tokenizer, bos_id, eos_id) from a directory holding tokenizer.json, or the file."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: not found (train one with "
                                "`python -m kvgate_train.tokenizer --out DIR`)")
    tok = Tokenizer.from_file(file)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    if bos is None or eos is None:
        raise ValueError(f"{file}: has no {BOS} / {EOS} special tokens")
    return tok, bos, eos


def training_texts(seed: int = 0, text_file: Optional[str] = None,
                   num_task_samples: int = 2000) -> list[str]:
    """The train split's natural text (one chapter per item) and synthetic task samples, so
    the task phrasing ("pass key", "VAR", the key words) gets its own merges."""
    from .data import TASKS, CorpusBuilder, load_chapters, split_chapters
    chapters = [" ".join(c) for c in split_chapters(load_chapters(text_file), "train")]
    b = CorpusBuilder(None, seed=seed, split="train", text_file=text_file)
    tasks = [b.sample(i, 256, TASKS[i % len(TASKS)]) for i in range(num_task_samples)]
    return chapters + [s.prompt + s.answer for s in tasks]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kvgate_train.tokenizer",
        description="Train the byte-level BPE tokenizer (Llama-3-style split, single digits, "
                    "BOS/EOS) on the corpus's training split and write tokenizer.json, "
                    "tokenizer_config.json and generation_config.json.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-file", help="plain-text file to use instead of the KJV")
    ap.add_argument("--model-max-length", type=int, default=2048)
    args = ap.parse_args(argv)
    tok = train_tokenizer(training_texts(args.seed, args.text_file), args.vocab_size)
    save_tokenizer_dir(tok, args.out, args.model_max_length)
    print(f"wrote {args.out}/tokenizer.json (vocab {tok.get_vocab_size()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
