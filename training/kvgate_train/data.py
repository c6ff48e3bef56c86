"""The training and evaluation corpus: public-domain English text interleaved with synthetic
long-context tasks in the style of RULER, each with its answer at the end.

Natural text: the King James Version of the Bible (public domain), shipped by Debian's packages
`bible-kjv-text` (the compressed text) and `bible-kjv` (the `bible` program that reads it):
`apt-get install bible-kjv bible-kjv-text`. `bible -f gen1:1-rev22:21` prints all 31,102 verses,
one per line. Any plain-text file (paragraphs separated by blank lines) can be used instead
with `--text-file`; a saved `bible -f gen1:1-rev22:21` output given that way is read exactly as
the package (same chapters, same splits), for machines without the package (a GPU box).

Tasks (the prompt ends with a question; the answer follows it, then EOS):
- passkey: a number hidden once in the filler; "What is the pass key? The pass key is" -> " 71432".
- kv: several "The value of {word} is {number}." lines scattered in the filler; one is asked.
- vartrack: "VAR ABCDE = 12345." then "VAR FGHIJ = VAR ABCDE." ... (a chain and a distractor
  chain, scattered); "Which variables are assigned the value 12345?" -> " ABCDE FGHIJ ...".
- text: plain natural text (language-model loss only, no answer).
- copy (training only): natural-text filler, then a segment S (random token ids, natural text
  or 5-digit numbers, 4 to 64 tokens) repeated to the end; the repeats are marked (mask value
  2) so their loss can be followed on its own.

Determinism and splits: sample `index` of split `split` is a pure function of (seed, split,
index, seq_len, kind) through a string-seeded `random.Random`. The natural text is split by
chapter (every 20th chapter is held out), and the synthetic tasks of the held-out split use a
different random stream, so held-out data never repeats training data.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

TASKS = ("passkey", "kv", "vartrack")
KINDS = TASKS + ("text",)
# Training-only kind: a segment repeated twice (random token ids or natural text ids), so the
# model is rewarded densely for copying from far back (induction heads) before the sparse
# retrieval answers can teach it. Built in token space by `training_example`.
TRAIN_KINDS = KINDS + ("copy",)
SPLITS = ("train", "heldout")
HELDOUT_EVERY = 20  # every 20th chapter/paragraph group is held out
KJV_RANGE = "gen1:1-rev22:21"
KJV_PACKAGES = "bible-kjv bible-kjv-text"

# RULER's noise filler.
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
         "There and back again.")

# Keys of the key-value task: short common nouns (one or two tokens each).
KEY_WORDS = (
    "apple", "river", "stone", "cloud", "horse", "bread", "candle", "garden", "mirror", "window",
    "basket", "bridge", "castle", "desert", "forest", "island", "ladder", "meadow", "needle",
    "orange", "pencil", "pillow", "rabbit", "saddle", "silver", "spider", "tiger", "turtle",
    "violin", "wagon", "whale", "winter", "anchor", "arrow", "banner", "barrel", "beacon", "bottle",
    "button", "camel", "canyon", "carpet", "cherry", "copper", "cotton", "dragon", "eagle",
    "engine", "falcon", "feather", "flute", "glove", "hammer", "harbor", "helmet", "jacket",
    "kettle", "lantern", "lemon", "magnet", "marble", "melon", "monkey", "number", "ocean",
    "paddle", "parrot", "pepper", "planet", "pocket", "puzzle", "rocket", "salmon", "shadow",
    "sponge", "summer", "thunder", "ticket", "tomato", "tunnel", "velvet", "walnut", "wizard",
    "yellow", "zebra", "acorn", "badge", "comet", "daisy", "ember", "fable", "grape", "hazel",
    "ivory", "jewel", "koala", "lotus", "maple", "nectar", "olive", "pearl", "quartz", "robin",
)

# Decoy sentences of training (`decoys`): other numbers in the filler, so that a pass key is told
# apart from any number. Evaluation's decoys use other wording (eval/prose_passkey.py).
TRAIN_DECOYS = ("The room number is {n}.", "He paid {n} coins for it.",
                "The code {n} was wrong.", "It was {n} miles away.", "Call {n} after noon.",
                "The year {n} came and went.")


@dataclass
class Sample:
    kind: str    # passkey | kv | vartrack | text
    prompt: str  # context and question (for `text`: the whole text)
    answer: str  # what the model must generate after the prompt (starts with a space); "" for text
    split: str
    index: int


# --------------------------------------------------------------------------- natural text


class NaturalTextError(RuntimeError):
    pass


@functools.lru_cache(maxsize=4)
def load_chapters(text_file: Optional[str] = None) -> tuple[tuple[str, ...], ...]:
    """The natural text as chapters, each a tuple of verses/sentences.

    Default: the KJV from Debian's bible-kjv (grouped by book and chapter). With `text_file`: a
    UTF-8 file whose paragraphs (separated by blank lines) are the units, grouped 20 to a chapter.
    """
    if text_file is not None:
        with open(text_file, encoding="utf-8") as f:
            text = f.read()
        verses = _verse_chapters(text.splitlines())
        if verses is not None:  # saved output of `bible -f ...`: the same chapters as the KJV
            return verses
        paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
        paras = [p for p in paras if p]
        if not paras:
            raise NaturalTextError(f"{text_file}: no text")
        return tuple(tuple(paras[i:i + 20]) for i in range(0, len(paras), 20))
    exe = shutil.which("bible")
    if exe is None:
        raise NaturalTextError(
            "the natural text comes from Debian's King James Bible packages, which are not "
            f"installed: run `apt-get install {KJV_PACKAGES}` (or pass --text-file)")
    proc = subprocess.run([exe, "-f", KJV_RANGE], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout:
        raise NaturalTextError(f"`bible -f {KJV_RANGE}` failed ({proc.returncode}): "
                               f"{proc.stderr.strip()[:200]}; is {KJV_PACKAGES} installed?")
    chapters = _verse_chapters(proc.stdout.splitlines())
    if chapters is None or len(chapters) < 1000:
        raise NaturalTextError(f"`bible -f {KJV_RANGE}` printed only "
                               f"{len(chapters or ())} chapters")
    return chapters


_VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def _verse_chapters(lines: Sequence[str]) -> Optional[tuple[tuple[str, ...], ...]]:
    """Verses in `bible -f` format ("Gen1:1 In the beginning ...") grouped by book and chapter;
    None when most lines are not verses (the text is plain paragraphs)."""
    chapters: list[list[str]] = []
    last = None
    matched = 0
    nonempty = 0
    for line in lines:
        if not line.strip():
            continue
        nonempty += 1
        m = _VERSE_RE.match(line)
        if not m:
            continue
        matched += 1
        key = (m.group(1), m.group(2))
        if key != last:
            chapters.append([])
            last = key
        chapters[-1].append(" ".join(m.group(4).split()))
    if nonempty == 0 or matched < 0.9 * nonempty:
        return None
    return tuple(tuple(c) for c in chapters)


def split_chapters(chapters: Sequence[Sequence[str]], split: str) -> list[Sequence[str]]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")
    held = split == "heldout"
    return [c for i, c in enumerate(chapters) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == held]


def natural_text(split: str, text_file: Optional[str] = None) -> str:
    """The split's natural text, one chapter per paragraph."""
    return "\n\n".join(" ".join(c) for c in split_chapters(load_chapters(text_file), split))


# ------------------------------------------------------------------------------- builder


def interleave(units: Sequence[str], needles: Sequence[str], rng: random.Random) -> list[str]:
    """The filler units with the needles inserted, in order, at sorted uniform random depths."""
    depths = sorted(rng.randrange(len(units) + 1) for _ in needles)
    pieces: list[str] = []
    d = 0
    for i in range(len(units) + 1):
        while d < len(needles) and depths[d] == i:
            pieces.append(needles[d])
            d += 1
        if i < len(units):
            pieces.append(units[i])
    return pieces


class CorpusBuilder:
    """Builds samples of a given length (tokens with a tokenizer, else about 4 chars a token).

    tokenizer: a `tokenizers.Tokenizer` (BOS/EOS ids from `bos_id`/`eos_id`), or None (lengths
      are then estimated; used to build the tokenizer's own training text).
    filler: "text" (natural text), "noise" (RULER's repeated sentences) or "mix" (either, 3:1).
    filler_sources: where natural text comes from: "kjv" (the KJV, or `text_file`) and any of
      prose.PROSE_SOURCES; with more than one, each sample draws its source uniformly.
    decoys: passkey samples get this many decoy sentences with other numbers (TRAIN_DECOYS).
    """

    def __init__(self, tokenizer=None, *, seed: int = 0, split: str = "train",
                 filler: str = "mix", text_file: Optional[str] = None,
                 kind_weights: Optional[dict] = None, kv_pairs: int = 4, var_chain: int = 4,
                 digits: int = 5, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 filler_sources: Sequence[str] = ("kjv",), decoys: int = 0):
        if filler not in ("text", "noise", "mix"):
            raise ValueError(f"filler must be text, noise or mix, not {filler!r}")
        self.tok = tokenizer
        self.seed, self.split, self.filler = seed, split, filler
        self.kv_pairs, self.var_chain, self.digits = kv_pairs, var_chain, digits
        self.kind_weights = kind_weights or {"passkey": 0.3, "kv": 0.3, "vartrack": 0.2,
                                             "text": 0.2}
        for k in self.kind_weights:
            if k not in TRAIN_KINDS:
                raise ValueError(f"unknown kind {k!r} (expected one of {TRAIN_KINDS})")
        self.bos_id, self.eos_id = bos_id, eos_id
        if not filler_sources or len(set(filler_sources)) != len(filler_sources):
            raise ValueError(f"filler_sources must be distinct and non-empty: {filler_sources}")
        if decoys < 0:
            raise ValueError(f"decoys must be >= 0, not {decoys}")
        self.decoys = decoys
        self.sources: list[tuple[list[str], np.ndarray]] = []
        for src in filler_sources:
            if src == "kjv":
                chapters = split_chapters(load_chapters(text_file), split)
            else:
                from .prose import load_prose
                chapters = split_chapters(load_prose(src), split)
            units = [v for c in chapters for v in c]
            self.sources.append((units, self._lengths(units)))
        self.verses, self._verse_len = self.sources[0]
        self._noise_len = self._lengths(NOISE)

    # -- lengths
    def _lengths(self, units: Sequence[str]) -> np.ndarray:
        if self.tok is None:
            return np.array([len(u) // 4 + 1 for u in units], dtype=np.int64)
        encs = self.tok.encode_batch([" " + u for u in units], add_special_tokens=False)
        return np.array([len(e.ids) for e in encs], dtype=np.int64)

    def length(self, text: str) -> int:
        if self.tok is None:
            return len(text) // 4 + 1
        return len(self.tok.encode(text, add_special_tokens=False).ids)

    def rng(self, index: int, seq_len: int, kind: Optional[str]) -> random.Random:
        return random.Random(f"kvgate/{self.seed}/{self.split}/{index}/{seq_len}/{kind}")

    # -- filler
    def _filler(self, rng: random.Random, budget: int, use_noise: bool) -> list[str]:
        """Consecutive filler units whose lengths add up to at most `budget`."""
        if use_noise:
            units, lens = NOISE, self._noise_len
        elif len(self.sources) == 1:
            units, lens = self.sources[0]
        else:
            units, lens = self.sources[rng.randrange(len(self.sources))]
        n = len(units)
        i = rng.randrange(n)
        out: list[str] = []
        total = 0
        while True:
            ln = int(lens[i % n])
            if total + ln > budget:
                break
            out.append(units[i % n])
            total += ln
            i += 1
        return out

    def _number(self, rng: random.Random) -> str:
        return str(rng.randrange(10 ** (self.digits - 1), 10 ** self.digits))

    def _var_name(self, rng: random.Random) -> str:
        return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))

    def _task(self, kind: str, rng: random.Random) -> tuple[list[str], str, str]:
        """(needles in order, question, answer)."""
        if kind == "passkey":
            n = self._number(rng)
            needles = [f"The pass key is {n}. Remember it. {n} is the pass key."]
            if self.decoys:
                decoys = [rng.choice(TRAIN_DECOYS).format(n=self._number(rng))
                          for _ in range(self.decoys)]
                at = rng.randrange(self.decoys + 1)  # the needle's place among the decoys
                needles = decoys[:at] + needles + decoys[at:]
            return needles, "What is the pass key? The pass key is", f" {n}"
        if kind == "kv":
            keys = rng.sample(KEY_WORDS, self.kv_pairs)
            vals: list[str] = []
            while len(vals) < self.kv_pairs:
                v = self._number(rng)
                if v not in vals:
                    vals.append(v)
            needles = [f"The value of {k} is {v}." for k, v in zip(keys, vals)]
            q = rng.randrange(self.kv_pairs)
            return needles, f"What is the value of {keys[q]}? The value of {keys[q]} is", \
                f" {vals[q]}"
        if kind == "vartrack":
            names: list[str] = []
            while len(names) < 2 * self.var_chain:
                v = self._var_name(rng)
                if v not in names:
                    names.append(v)
            chain, other = names[:self.var_chain], names[self.var_chain:]
            val = self._number(rng)
            val2 = self._number(rng)
            while val2 == val:
                val2 = self._number(rng)

            def stmts(c: list[str], value: str) -> list[str]:
                return [f"VAR {c[0]} = {value}."] + [f"VAR {c[j]} = VAR {c[j - 1]}."
                                                     for j in range(1, len(c))]
            a, b = stmts(chain, val), stmts(other, val2)
            # Interleave the two chains, keeping each chain's order.
            order = [0] * len(a) + [1] * len(b)
            rng.shuffle(order)
            ia = ib = 0
            needles = []
            for o in order:
                if o == 0:
                    needles.append(a[ia])
                    ia += 1
                else:
                    needles.append(b[ib])
                    ib += 1
            return needles, f"Which variables are assigned the value {val}? Answer:", \
                " " + " ".join(chain)
        raise ValueError(f"unknown task {kind!r}")

    def pick_kind(self, rng: random.Random) -> str:
        kinds = list(self.kind_weights)
        return rng.choices(kinds, weights=[self.kind_weights[k] for k in kinds])[0]

    def sample(self, index: int, seq_len: int, kind: Optional[str] = None) -> Sample:
        """Sample `index` of this split, sized to fit `seq_len` tokens with BOS, answer and EOS."""
        rng = self.rng(index, seq_len, kind)
        if kind is None:
            kind = self.pick_kind(rng)
        if kind == "copy":
            raise ValueError("copy samples exist only as token ids (training_example)")
        if kind == "text":
            # A little more than needed; `encode` truncates to seq_len + 1 tokens.
            return Sample("text", " ".join(self._filler(rng, seq_len + 64, False)), "",
                          self.split, index)
        use_noise = self.filler == "noise" or (self.filler == "mix" and rng.random() < 0.25)
        needles, question, answer = self._task(kind, rng)
        overhead = (sum(self.length(" " + n) for n in needles) + self.length("\n" + question)
                    + self.length(answer) + 2)
        budget = seq_len + 1 - overhead
        for attempt in range(8):
            units = self._filler(rng if attempt == 0 else random.Random(rng.random()),
                                 max(budget, 0), use_noise) if budget > 0 else []
            prompt = " ".join(interleave(units, needles, rng)) + "\n" + question
            s = Sample(kind, prompt, answer, self.split, index)
            if self.tok is None or len(self.encode_ids(s)) <= seq_len + 1:
                return s
            budget -= max(8, (len(self.encode_ids(s)) - seq_len - 1) + 4)
        raise ValueError(f"a {kind} sample does not fit in {seq_len} tokens (its needles and "
                         "question alone are about "
                         f"{overhead} tokens): use a longer length")

    # -- token ids
    def encode_ids(self, s: Sample) -> list[int]:
        """[BOS] prompt answer [EOS] (text: [BOS] text)."""
        assert self.tok is not None and self.bos_id is not None and self.eos_id is not None
        ids = self.tok.encode(s.prompt + s.answer, add_special_tokens=False).ids
        if s.kind == "text":
            return [self.bos_id] + ids
        return [self.bos_id] + ids + [self.eos_id]

    def prompt_ids(self, s: Sample) -> list[int]:
        return [self.bos_id] + self.tok.encode(s.prompt, add_special_tokens=False).ids

    def answer_ids(self, s: Sample) -> list[int]:
        return self.tok.encode(s.answer, add_special_tokens=False).ids

    def training_example(self, index: int, seq_len: int, kind: Optional[str] = None):
        """(inputs [seq_len], targets [seq_len] with -100 for padding, mask [seq_len]) as
        int64/int64/uint8 numpy arrays. mask is 1 on the targets that are answer tokens or the
        EOS after them, 2 on the predictable targets of a copy sample's second copy, else 0."""
        if kind is None:
            kind = self.pick_kind(self.rng(index, seq_len, None))
        if kind == "copy":
            return self._copy_example(index, seq_len)
        s = self.sample(index, seq_len, kind)
        ids = self.encode_ids(s)[:seq_len + 1]
        n_ans = 0 if s.kind == "text" else len(self.answer_ids(s)) + 1
        if s.kind != "text":
            # The answer's ids must be the tail of the whole encoding (checked, not assumed).
            p = self.prompt_ids(s)
            if ids[:len(p)] != p:
                raise RuntimeError(f"{s.kind} sample {index}: prompt tokens change when the "
                                   "answer is appended")
        inputs = np.full(seq_len, self.eos_id, dtype=np.int64)
        targets = np.full(seq_len, -100, dtype=np.int64)
        mask = np.zeros(seq_len, dtype=np.uint8)
        n = len(ids) - 1
        inputs[:n] = ids[:-1]
        targets[:n] = ids[1:]
        if n_ans:
            mask[n - n_ans:n] = 1
        return inputs, targets, mask

    def _copy_example(self, index: int, seq_len: int):
        """[BOS] F S S S ... : natural-text filler, then a segment S of random length (4 to 64
        tokens) repeated to the end. S is random token ids, natural text or 5-digit numbers (a
        third each). Every token after the first copy of S can be read from one period back,
        and the period differs between samples, so only matching content (an induction head),
        not a fixed offset, predicts it; the numbers teach copying digits, where one previous
        token is ambiguous."""
        assert self.tok is not None and self.bos_id is not None
        rng = self.rng(index, seq_len, "copy")
        h = rng.randint(4, min(64, seq_len // 4))
        specials = {self.bos_id, self.eos_id}
        kind = rng.randrange(3)
        seg: list[int] = []
        if kind == 1:
            text = " ".join(self._filler(rng, h + 64, False))
            seg = self.tok.encode(text, add_special_tokens=False).ids[:h]
        elif kind == 2:
            text = " " + " ".join(self._number(rng) for _ in range(h // 5 + 2))
            seg = self.tok.encode(text, add_special_tokens=False).ids[:h]
        if len(seg) < 4:  # random token ids (also when the text came out too short)
            vocab = self.tok.get_vocab_size()
            seg = []
            while len(seg) < h:
                t = rng.randrange(vocab)
                if t not in specials:
                    seg.append(t)
        h = len(seg)
        a = rng.randint(0, seq_len // 4)  # filler before the repeats
        text = " ".join(self._filler(rng, a + 64, False))
        fill = self.tok.encode(text, add_special_tokens=False).ids[:a]
        a = len(fill)
        reps = (seq_len + 1 - 1 - a) // h + 1
        ids = ([self.bos_id] + fill + seg * reps)[:seq_len + 1]
        inputs = np.array(ids[:seq_len], dtype=np.int64)
        targets = np.array(ids[1:seq_len + 1], dtype=np.int64)
        mask = np.zeros(seq_len, dtype=np.uint8)
        # Target j is ids[j + 1]; the repeats start at id 1 + a + h.
        mask[a + h:] = 2
        return inputs, targets, mask

    def batch(self, start: int, batch_size: int, seq_len: int):
        xs, ys, ms = zip(*(self.training_example(start + i, seq_len)
                           for i in range(batch_size)))
        return np.stack(xs), np.stack(ys), np.stack(ms)


def answer_in_context(s: Sample) -> bool:
    """Whether the sample's answer can be read from its context (not from the question)."""
    if s.kind == "text":
        return True
    context = s.prompt.rsplit("\n", 1)[0]
    a = s.answer.strip()
    if s.kind == "passkey":
        return f"The pass key is {a}." in context
    if s.kind == "kv":
        key = re.search(r"What is the value of (\w+)\?", s.prompt).group(1)
        return f"The value of {key} is {a}." in context
    if s.kind == "vartrack":
        val = re.search(r"assigned the value (\d+)\?", s.prompt).group(1)
        names = a.split()
        ok = f"VAR {names[0]} = {val}." in context
        for prev, cur in zip(names, names[1:]):
            ok = ok and f"VAR {cur} = VAR {prev}." in context
        # And no other variable holds the value.
        assigned = set(re.findall(r"VAR (\w+) = " + val + r"\.", context))
        return ok and assigned == {names[0]}
    raise ValueError(s.kind)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kvgate_train.data",
        description="Build or inspect the corpus: natural public-domain text (KJV, from Debian's "
                    "bible-kjv-text) interleaved with passkey, key-value and variable-tracking "
                    "tasks whose answer is at the end.")
    ap.add_argument("--tokenizer", help="directory with tokenizer.json (lengths in tokens); "
                    "without it lengths are estimated at 4 characters a token")
    ap.add_argument("--split", choices=SPLITS, default="train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num", type=int, default=3, help="number of samples")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--kind", choices=KINDS, help="only this kind (default: the training mix)")
    ap.add_argument("--filler", choices=("text", "noise", "mix"), default="mix")
    ap.add_argument("--text-file", help="plain-text file to use instead of the KJV")
    ap.add_argument("--out", help="write the samples as JSON lines here (default: print them)")
    ap.add_argument("--natural-text-out", help="write the split's natural text to this file")
    args = ap.parse_args(argv)
    tok = bos = eos = None
    if args.tokenizer:
        from .tokenizer import load_tokenizer
        tok, bos, eos = load_tokenizer(args.tokenizer)
    try:
        b = CorpusBuilder(tok, seed=args.seed, split=args.split, filler=args.filler,
                          text_file=args.text_file, bos_id=bos, eos_id=eos)
    except NaturalTextError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.natural_text_out:
        with open(args.natural_text_out, "w") as f:
            f.write(natural_text(args.split, args.text_file))
    out = open(args.out, "w") if args.out else None
    for i in range(args.num):
        s = b.sample(i, args.seq_len, args.kind)
        rec = asdict(s)
        if tok is not None:
            rec["num_tokens"] = len(b.encode_ids(s))
        if out:
            out.write(json.dumps(rec) + "\n")
        else:
            print(json.dumps(rec, indent=1))
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
