import numpy as np
import pytest

from kvgate_train.data import (HELDOUT_EVERY, KINDS, TASKS, CorpusBuilder, answer_in_context,
                               load_chapters, split_chapters)


@pytest.fixture(scope="module")
def builders(tok):
    t, bos, eos = tok
    return {split: CorpusBuilder(t, seed=0, split=split, bos_id=bos, eos_id=eos)
            for split in ("train", "heldout")}


def test_natural_text_is_the_kjv_and_splits_are_disjoint():
    chapters = load_chapters()
    assert len(chapters) == 1189  # the KJV's chapters
    assert chapters[0][0].startswith("In the beginning God created the heaven and the earth.")
    train, held = split_chapters(chapters, "train"), split_chapters(chapters, "heldout")
    assert len(held) == len(chapters) // HELDOUT_EVERY
    assert len(train) + len(held) == len(chapters)
    assert not set(map(tuple, train)) & set(map(tuple, held))


@pytest.mark.parametrize("split", ["train", "heldout"])
@pytest.mark.parametrize("filler", ["text", "noise", "mix"])
def test_every_task_answer_is_in_its_context(tok, split, filler):
    t, bos, eos = tok
    b = CorpusBuilder(t, seed=7, split=split, filler=filler, bos_id=bos, eos_id=eos)
    for kind in TASKS:
        for length in (256, 512, 2048):
            for i in range(25):
                s = b.sample(i, length, kind)
                assert s.kind == kind
                assert answer_in_context(s), (kind, length, i, s.prompt[-300:], s.answer)
                # The question is at the end and the answer is not in the question itself.
                assert s.answer.strip() not in s.prompt.rsplit("\n", 1)[1]
                ids = b.encode_ids(s)
                assert len(ids) <= length + 1


def test_answer_checker_catches_a_missing_answer(builders):
    s = builders["train"].sample(0, 256, "passkey")
    broken = type(s)(s.kind, s.prompt.replace(s.answer.strip(), "00000"), s.answer, s.split,
                     s.index)
    assert not answer_in_context(broken)


def test_training_examples_have_the_answer_at_the_end(builders, tok):
    t, bos, eos = tok
    b = builders["train"]
    for kind in KINDS:
        for i in range(5):
            x, y, m = b.training_example(i, 512, kind)
            assert x.shape == y.shape == m.shape == (512,)
            assert x[0] == bos
            s = b.sample(i, 512, kind)
            if kind == "text":
                assert not m.any() and (y != -100).all()
                continue
            assert set(m.tolist()) == {0, 1}
            answer = y[m == 1].tolist()
            assert answer[-1] == eos
            assert t.decode(answer[:-1]) == s.answer
            last = max(j for j in range(512) if m[j] == 1)
            assert (y[last + 1:] == -100).all()  # only padding after the answer's EOS
            assert (y[:last + 1] != -100).all()


def test_deterministic_and_heldout_differs(builders, tok):
    t, bos, eos = tok
    again = CorpusBuilder(t, seed=0, split="train", bos_id=bos, eos_id=eos)
    for i in range(10):
        assert again.sample(i, 512) == builders["train"].sample(i, 512)
    train = {builders["train"].sample(i, 512, k).prompt for i in range(20) for k in KINDS}
    held = {builders["heldout"].sample(i, 512, k).prompt for i in range(20) for k in KINDS}
    assert not train & held
    # The held-out filler comes only from held-out chapters.
    held_chapters = split_chapters(load_chapters(), "heldout")
    assert builders["heldout"].verses == [v for c in held_chapters for v in c]
    other_seed = CorpusBuilder(t, seed=1, split="train", bos_id=bos, eos_id=eos)
    assert other_seed.sample(0, 512, "passkey") != builders["train"].sample(0, 512, "passkey")


def test_too_short_a_length_is_refused(builders):
    with pytest.raises(ValueError, match="does not fit in 64 tokens"):
        builders["train"].sample(0, 64, "vartrack")


def test_samples_fill_most_of_the_length(builders):
    b = builders["train"]
    for kind in TASKS:
        n = [len(b.encode_ids(b.sample(i, 2048, kind))) for i in range(10)]
        assert min(n) > 0.9 * 2049, (kind, n)


def test_copy_examples_repeat_their_segment(builders):
    b = builders["train"]
    periods = set()
    for i in range(12):
        x, y, m = b.training_example(i, 256, "copy")
        assert x.shape == y.shape == m.shape == (256,)
        assert x[0] == b.bos_id and (x[1:] == y[:-1]).all()
        idx = np.nonzero(m == 2)[0]
        assert len(idx) >= 64 and (np.diff(idx) == 1).all() and idx[-1] == 255
        # Every marked target equals the target one period earlier.
        period = [p for p in range(4, 65) if (y[idx] == y[idx - p]).all()]
        assert period, i
        periods.add(period[0])
    assert len(periods) > 6  # periods vary between samples


@pytest.mark.parametrize("source", ["fortunes", "jargon", "devil", "licenses"])
def test_prose_sources_are_sentences_of_english(source):
    from kvgate_train.prose import UNITS_PER_CHAPTER, load_prose
    chapters = load_prose(source)
    units = [u for c in chapters for u in c]
    assert len(units) > 1000, len(units)
    assert all(len(c) == UNITS_PER_CHAPTER for c in chapters[:-1])
    # Prose, not ASCII art or tables: mostly letters, and sentences end like sentences.
    for u in units[::97]:
        assert sum(c.isalpha() or c == " " for c in u) >= 0.85 * len(u), u
        assert "\n" not in u and "  " not in u, u
    ends = sum(u.rstrip("\"')").endswith((".", "!", "?")) for u in units)
    assert ends > 0.6 * len(units), (source, ends, len(units))


def test_a_missing_prose_package_is_named(tmp_path):
    from kvgate_train.prose import ProseError, load_prose
    with pytest.raises(ProseError, match="apt-get install dict-devil"):
        load_prose("devil", str(tmp_path / "devil.dict.dz"))
    with pytest.raises(ValueError, match="unknown prose source"):
        load_prose("shakespeare")


def test_varied_filler_draws_on_every_source_and_keeps_the_split(tok):
    from kvgate_train.prose import load_prose
    t, bos, eos = tok
    sources = ("kjv", "fortunes", "jargon")
    b = CorpusBuilder(t, seed=0, split="train", filler="text", bos_id=bos, eos_id=eos,
                      filler_sources=sources)
    units = {"kjv": {v for c in split_chapters(load_chapters(), "train") for v in c}}
    held = {}
    for s in sources[1:]:
        units[s] = {v for c in split_chapters(load_prose(s), "train") for v in c}
        held[s] = {v for c in split_chapters(load_prose(s), "heldout") for v in c} - units[s]
    seen = {s: 0 for s in sources}
    for i in range(30):
        prompt = b.sample(i, 512, "passkey").prompt
        first = prompt.split(". ")[0] + "."
        for s in sources:
            seen[s] += any(u.startswith(first) for u in units[s])
        for s in held:  # a held-out sentence never reaches training
            assert not any(u in prompt for u in list(held[s])[:2000] if len(u) > 60)
    assert all(n >= 3 for n in seen.values()), seen
    with pytest.raises(ValueError, match="distinct"):
        CorpusBuilder(t, filler_sources=("kjv", "kjv"), bos_id=bos, eos_id=eos)


def test_decoys_surround_the_pass_key_with_other_numbers(tok):
    import re
    from kvgate_train.data import TRAIN_DECOYS
    t, bos, eos = tok
    b = CorpusBuilder(t, seed=0, split="train", filler="text", bos_id=bos, eos_id=eos, decoys=3)
    plain = CorpusBuilder(t, seed=0, split="train", filler="text", bos_id=bos, eos_id=eos)
    patterns = [re.escape(d).replace(re.escape("{n}"), r"(\d{5})") for d in TRAIN_DECOYS]
    for i in range(20):
        s = b.sample(i, 1024, "passkey")
        key = s.answer.strip()
        found = [m for p in patterns for m in re.findall(p, s.prompt)]
        assert len(found) >= 3, s.prompt
        assert key not in found or found.count(key) < len(found)
        assert answer_in_context(s)
        assert not any(re.search(p, plain.sample(i, 1024, "passkey").prompt) for p in patterns)
