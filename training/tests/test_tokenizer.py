import json
import os
import subprocess

import pytest

from conftest import KVGATE_BIN

SAMPLES = [
    "The pass key is 71432. Remember it. 71432 is the pass key.",
    "In the beginning God created the heaven and the earth.\n\nAnd the earth was without form.",
    "VAR QWXZE = 12345. VAR ABCDE = VAR QWXZE.\nWhich variables are assigned the value 12345?",
    "Unicode: café, naïve, 東京, emoji 🙂, tabs\tand  double  spaces, it's they'll I'd.",
    "  leading spaces and trailing newline\n",
    "numbers 0 1 23 456 7890 3.14159 -42 1,000,000",
]


def test_round_trip_and_specials(tok, tokenizer_dir):
    t, bos, eos = tok
    assert (bos, eos) == (0, 1)
    for s in SAMPLES:
        ids = t.encode(s).ids
        assert ids[0] == bos  # the post-processor adds BOS
        assert t.decode(ids[1:]) == s
        assert t.decode(ids, skip_special_tokens=True) == s
    # Digits are single tokens.
    toks = t.encode("7890", add_special_tokens=False).tokens
    assert toks == ["7", "8", "9", "0"]
    cfg = json.load(open(os.path.join(tokenizer_dir, "tokenizer_config.json")))
    assert cfg["add_bos_token"] is True
    assert cfg["bos_token"] == "<|begin_of_text|>" and cfg["eos_token"] == "<|end_of_text|>"
    gen = json.load(open(os.path.join(tokenizer_dir, "generation_config.json")))
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (bos, eos)
    assert t.get_vocab_size() == 1024


def kvgate_tokenize(path, text, special):
    cmd = [KVGATE_BIN, "tokenize", "--tokenizer", path, "--json", text]
    if not special:
        cmd.insert(-1, "--no-special")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_cpp_tokenizer_parity(tok, tokenizer_dir):
    if not os.access(KVGATE_BIN, os.X_OK):
        pytest.fail(f"{KVGATE_BIN} is not built: build it first (cmake --preset release && "
                    "cmake --build build; scripts/test.sh does) for the C++ tokenizer parity check")
    t, _, _ = tok
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    for s in SAMPLES:
        assert kvgate_tokenize(path, s, True) == t.encode(s).ids, s
        assert kvgate_tokenize(path, s, False) == t.encode(s, add_special_tokens=False).ids, s
