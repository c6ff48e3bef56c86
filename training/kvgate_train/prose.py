"""English prose other than the KJV, from Debian packages, as filler units (one sentence each).

Sources (`PROSE_SOURCES`), each a tuple of "chapters" (tuples of sentences), so that the same
train / held-out split as the KJV's applies (every 20th chapter held out, data.py):

- fortunes: the quotations and jokes of Debian's `fortunes` (/usr/share/games/fortunes);
- jargon:   the Jargon File (hacker slang, technical prose; Debian's `dict-jargon`);
- devil:    Ambrose Bierce's The Devil's Dictionary (1911; Debian's `dict-devil`);
- licenses: the license texts every Debian system has (/usr/share/common-licenses).

Filler for training draws on `TRAIN_PROSE` (kjv, fortunes, jargon). `HELDOUT_PROSE` (devil,
licenses) is what no trainer reads: evaluation on it measures text the gates and heads have not
seen (eval/prose_passkey.py).
"""

from __future__ import annotations

import functools
import gzip
import os
import re
from typing import Optional

from .data import NaturalTextError

PROSE_SOURCES = ("fortunes", "jargon", "devil", "licenses")
TRAIN_PROSE = ("kjv", "fortunes", "jargon")
HELDOUT_PROSE = ("devil", "licenses")
PACKAGES = {"fortunes": "fortunes", "jargon": "dict-jargon", "devil": "dict-devil"}
PATHS = {"fortunes": "/usr/share/games/fortunes", "jargon": "/usr/share/dictd/jargon.dict.dz",
         "devil": "/usr/share/dictd/devil.dict.dz", "licenses": "/usr/share/common-licenses"}
UNITS_PER_CHAPTER = 20

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


class ProseError(NaturalTextError):
    pass


def _sentences(paragraph: str) -> list[str]:
    text = " ".join(paragraph.split())
    return [s for s in _SENTENCE_END.split(text) if s]


def _prose_like(text: str) -> bool:
    """Mostly letters and spaces: drops ASCII art, tables, code and headers."""
    if len(text) < 20:
        return False
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters >= 0.85 * len(text) and text.count(" ") >= 3


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read(source: str, root: str) -> list[str]:
    """The source's paragraphs in reading order."""
    if source == "fortunes":
        out = []
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if "." in name or os.path.islink(path) or not os.path.isfile(path):
                continue  # the .dat indexes and the .u8 links
            with open(path, encoding="utf-8", errors="replace") as f:
                for cookie in re.split(r"^%\s*$", f.read(), flags=re.M):
                    lines = [ln for ln in cookie.splitlines() if not ln.strip().startswith("--")]
                    out.append("\n".join(lines))
        return out
    if source in ("jargon", "devil"):
        with gzip.open(root, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        return [p for p in _paragraphs(text) if not p.lstrip().startswith("00-database")]
    if source == "licenses":
        out = []
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue  # GPL -> GPL-3 and the like: read once
            with open(path, encoding="utf-8", errors="replace") as f:
                out += _paragraphs(f.read())
        return out
    raise ValueError(f"unknown prose source {source!r} (expected one of {PROSE_SOURCES})")


@functools.lru_cache(maxsize=8)
def load_prose(source: str, root: Optional[str] = None) -> tuple[tuple[str, ...], ...]:
    """The source as chapters of UNITS_PER_CHAPTER sentences. Raises ProseError when the
    package is missing or the text is empty."""
    if source not in PROSE_SOURCES:
        raise ValueError(f"unknown prose source {source!r} (expected one of {PROSE_SOURCES})")
    root = root or PATHS[source]
    if not os.path.exists(root):
        pkg = PACKAGES.get(source)
        hint = f": run `apt-get install {pkg}`" if pkg else ""
        raise ProseError(f"prose source {source!r} needs {root}, which is missing{hint}")
    units = [s for p in _read(source, root) for s in _sentences(p) if _prose_like(s)]
    if len(units) < UNITS_PER_CHAPTER:
        raise ProseError(f"prose source {source!r}: only {len(units)} sentences in {root}")
    return tuple(tuple(units[i:i + UNITS_PER_CHAPTER])
                 for i in range(0, len(units), UNITS_PER_CHAPTER))
