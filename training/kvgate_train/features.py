"""Token sequences for training retaining heads and gates on any Llama-family checkpoint.

Three sources (`--data`):
- tasks: kvgate's corpus (passkey / kv / vartrack tasks and natural text, data.py); needs the
  model's tokenizer.json. The answer of a task sample is its answer tokens and EOS.
- text: natural text (the KJV from Debian, or `--text-file`) through the model's tokenizer.json.
- sample: sequences sampled from the model itself (temperature 1, seeded) starting at BOS; no
  tokenizer needed, and the text is in the model's own distribution (used for stories260K).

For text and sampled sequences the "answer" (what Locret's labels take the max over) is the
last `tail` tokens.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

import torch

from .model import LlamaForCausalLM, WeightsError

FILLER_HELP = ("natural-text filler sources, comma-separated: kjv and any of fortunes, jargon, "
               "devil, licenses (prose.py); kjv,fortunes,jargon trains on varied prose and "
               "leaves devil and licenses unseen for evaluation")

DATA_SOURCES = ("tasks", "text", "sample")


@dataclass
class Sequence:
    ids: list[int]   # prompt then answer
    n_prompt: int    # the first n_prompt ids are the prompt


class SequenceSource:
    def __init__(self, model: LlamaForCausalLM, model_dir: str, data: str, seq_len: int,
                 split: str, seed: int = 0, tail: int = 32, text_file: Optional[str] = None,
                 kind_weights: Optional[dict] = None, filler_sources: tuple = ("kjv",),
                 decoys: int = 0):
        if data not in DATA_SOURCES:
            raise ValueError(f"unknown data source {data!r} (expected one of {DATA_SOURCES})")
        if tail < 1 or tail >= seq_len:
            raise ValueError(f"tail {tail} must be in [1, seq_len)")
        self.model, self.data, self.seq_len, self.split = model, data, seq_len, split
        self.seed, self.tail = seed, tail
        self.builder = None
        self.bos = model.config.bos_token_id if model.config.bos_token_id is not None else 1
        if data in ("tasks", "text"):
            tok_path = os.path.join(model_dir, "tokenizer.json")
            if not os.path.exists(tok_path):
                raise WeightsError(f"--data {data} needs {tok_path} (use --data sample for a "
                                   "model without a tokenizer.json)")
            from .data import CorpusBuilder
            from .tokenizer import load_tokenizer
            tok, bos, eos = load_tokenizer(model_dir)
            weights = kind_weights or ({"passkey": 0.3, "kv": 0.3, "vartrack": 0.2, "text": 0.2}
                                       if data == "tasks" else {"text": 1.0})
            self.builder = CorpusBuilder(tok, seed=seed, split=split, text_file=text_file,
                                         kind_weights=weights, bos_id=bos, eos_id=eos,
                                         filler_sources=filler_sources, decoys=decoys)

    def get(self, index: int) -> Sequence:
        if self.builder is not None:
            b = self.builder
            s = b.sample(index, self.seq_len)
            ids = b.encode_ids(s)[:self.seq_len]
            if s.kind == "text":
                return Sequence(ids, len(ids) - self.tail)
            n_prompt = len(b.prompt_ids(s))
            return Sequence(ids, n_prompt)
        return self._sampled(index)

    @torch.no_grad()
    def _sampled(self, index: int) -> Sequence:
        split_offset = 0 if self.split == "train" else 1_000_003
        gen = torch.Generator().manual_seed(self.seed * 7919 + split_offset + index)
        m = self.model
        from .model import KVCache
        device = m.model.embed_tokens.weight.device
        cache = KVCache(m.config.num_hidden_layers)
        ids = [self.bos]
        logits = m(torch.tensor([ids], device=device), cache=cache)
        limit = min(self.seq_len, m.config.max_position_embeddings)
        while len(ids) < limit:
            probs = torch.softmax(logits[0, -1].float().cpu(), dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            ids.append(nxt)
            logits = m(torch.tensor([[nxt]], device=device), cache=cache)
        return Sequence(ids, len(ids) - self.tail)


def load_frozen(args) -> tuple[LlamaForCausalLM, torch.device, "SequenceSource", "SequenceSource"]:
    """The frozen model of `args.model` on `args.device` (threads from `args.threads`) and its
    train / held-out sequence sources from `args.data`, `args.seq_len` (capped at the model's
    context), `args.seed`, `args.tail`, `args.text_file`, `args.filler_sources` (comma-separated,
    default kjv) and `args.decoys`. Raises WeightsError / ValueError."""
    from .train_lm import pick_device
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model = LlamaForCausalLM.from_pretrained(args.model, device=str(device))
    model.requires_grad_(False).eval()
    seq_len = min(args.seq_len, model.config.max_position_embeddings)
    fillers = tuple(x.strip() for x in (getattr(args, "filler_sources", None) or "kjv").split(",")
                    if x.strip())
    decoys = getattr(args, "decoys", 0) or 0
    sources = [SequenceSource(model, args.model, args.data, seq_len, split, args.seed, args.tail,
                              args.text_file, filler_sources=fillers, decoys=decoys)
               for split in ("train", "heldout")]
    return model, device, sources[0], sources[1]


def shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order
