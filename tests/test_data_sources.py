"""--data sources: CSV/TSV text columns, JSON lines, folders; window counts asked for vs given."""

from __future__ import annotations

import bz2
import csv
import json
import logging

import pytest

from conftest import TEXT
from ranklm import RanklmError
from ranklm.calibration import TextSource, read_text_source, token_windows


def _write_csv(path, rows, fields, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)


def test_csv_reads_the_text_column_only(tmp_path):
    p = tmp_path / "speeches.csv"
    _write_csv(p, [{"party": "a", "text": "First speech, with a comma.", "speaker": "x"},
                   {"party": "b", "text": "Second\nspeech on two lines.", "speaker": "y"}], ["party", "text", "speaker"])
    src = read_text_source(p)
    assert src.documents == ["First speech, with a comma.", "Second\nspeech on two lines."]
    assert not any("party" in d or "speaker" in d for d in src.documents)  # no header, no other columns
    assert "'text' column" in src.description and "2 rows" in src.description


def test_csv_column_name_is_case_insensitive_and_bom_tolerant(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffText,label\nhello there,1\n".encode("utf-8"))
    assert read_text_source(p).documents == ["hello there"]


def test_csv_without_a_text_column_lists_its_columns(tmp_path):
    p = tmp_path / "reviews.csv"
    _write_csv(p, [{"review": "good", "stars": "5"}], ["review", "stars"])
    with pytest.raises(RanklmError, match=r"has no 'text' column to calibrate on; its columns: 'review', 'stars'"):
        read_text_source(p)


def test_tsv_and_compressed_csv(tmp_path):
    t = tmp_path / "data.tsv"
    _write_csv(t, [{"id": "1", "text": "tab, separated"}], ["id", "text"], delimiter="\t")
    assert read_text_source(t).documents == ["tab, separated"]
    c = tmp_path / "data.csv.bz2"
    c.write_bytes(bz2.compress(b"text,id\ncompressed row,1\n"))
    assert read_text_source(c).documents == ["compressed row"]


def test_jsonl_reads_the_text_field(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps({"id": i, "text": f"doc {i}"}) for i in range(3)) + "\n")
    assert read_text_source(p).documents == ["doc 0", "doc 1", "doc 2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(RanklmError, match="bad.jsonl:1 has no string 'text' field"):
        read_text_source(bad)


def test_folder_mixes_text_csv_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    _write_csv(tmp_path / "b.csv", [{"text": "from csv", "x": "1"}], ["text", "x"])
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    assert read_text_source(tmp_path).documents == ["plain text", "from csv", "from jsonl"]


def _source() -> TextSource:
    return TextSource("test text", [TEXT * 20])


def test_asking_for_more_calibration_windows_than_the_text_gives_is_an_error(tiny_tokenizer):
    all_windows = token_windows(tiny_tokenizer, _source(), 32, purpose="evaluation")
    n = len(all_windows)
    assert n > 4
    assert len(token_windows(tiny_tokenizer, _source(), 32, n, seed=0)) == n  # exactly what it gives: fine
    with pytest.raises(RanklmError, match=rf"calibration text too short for --calib-windows 100000: its \d+ tokens give {n} windows of 32"):
        token_windows(tiny_tokenizer, _source(), 32, 100000, seed=0)
    # a default count (not the user's) may ask for "at most"
    assert len(token_windows(tiny_tokenizer, _source(), 32, 100000, seed=0, strict=False)) == n


def test_evaluation_windows_mean_at_most_and_say_so(tiny_tokenizer, caplog):
    n = len(token_windows(tiny_tokenizer, _source(), 32, purpose="evaluation"))
    with caplog.at_level(logging.INFO, logger="ranklm.calibration.data"):
        w = token_windows(tiny_tokenizer, _source(), 32, 100000, purpose="evaluation")
    assert len(w) == n
    assert f"100000 windows of 32 tokens asked for, the text gives {n}; using all {n}" in caplog.text
    with pytest.raises(RanklmError, match="evaluation text too short"):
        token_windows(tiny_tokenizer, _source(), 32, 100000, purpose="evaluation", strict=True)
