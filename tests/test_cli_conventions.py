"""CLI conventions: help that shows defaults, --version/-h, one way to name the model, --threads recorded,
and bad input refused with one line before any work (nothing written)."""

import json
import os
import subprocess
import sys

import pytest

from ranklm.cli import main

FAST = ["--calib-windows", "4", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--batch-size", "2"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_shows_every_default_and_no_stray_markup(capsys):
    code, out, err = run(capsys, "compress", "--help")
    assert code == 0, err
    import re

    # each option's own entry: from its line to the next option's line
    entries = {}
    for m in re.finditer(r"^  (?:-\w, )?(--[\w-]+)(.*?)(?=^  -|\Z)", out, re.S | re.M):
        entries[m.group(1)] = " ".join(m.group(2).split())
    for flag, default in [("--keep", "0.8"), ("--recipe", "kfac-global for causal LMs"),
                          ("--model", "packaged SmolLM2-135M-Instruct"), ("--data", "packaged convention speeches"),
                          ("--eval-data", "held-out part of --data"), ("--calib-windows", "128; 32 for the learning"),
                          ("--round-to", "1"), ("--max-flop-ratio", "1.0"), ("--sequential", "on for whiten/asvd"),
                          ("--seq-len", "512"), ("--threads", "torch's default"), ("--device", "cpu"),
                          ("--min-rank", "1")]:
        entry = entries[flag]
        assert "[default: " in entry and default in entry[entry.index("[default: "):], (flag, entry)
    assert not re.search(r" \.(\s|$)", out), "a stray ' .' (Rich markup used to eat bracketed defaults)"
    code, out, _ = run(capsys, "evaluate", "--help")
    assert "ranklm[eval]" in out  # the extra's name survives in the lm-eval hint
    code, out, _ = run(capsys, "compress", "-h")
    assert code == 0 and "--keep" in out


def test_version_and_help_do_not_import_torch():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = ("import sys; from ranklm.cli import main; rc = main(['--version']); "
            "main(['compress', '--help']); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    from ranklm import __version__

    assert res.stdout.startswith(f"ranklm {__version__}")


@pytest.mark.parametrize("command", ["compress", "evaluate", "generate", "bench", "finetune"])
def test_every_model_command_takes_threads_device_and_both_model_spellings(capsys, command):
    code, out, err = run(capsys, command, "--help")
    assert code == 0, err
    assert "--threads" in out and "[MODEL]" in out and "--model" in out
    if command in ("compress", "evaluate", "generate"):
        assert "--device" in out


def test_two_different_models_are_refused(capsys, tiny_llama_dir, text_file, tmp_path):
    code, _, err = run(capsys, "evaluate", tiny_llama_dir, "--model", tmp_path, "--data", text_file)
    assert code == 2 and err.startswith("error: two models given")


def test_positional_model_and_threads_recorded(capsys, tiny_llama_dir, text_file, tmp_path):
    import torch

    before = torch.get_num_threads()
    out_dir = tmp_path / "ckpt"
    try:
        code, out, err = run(capsys, "compress", tiny_llama_dir, "--data", text_file, "--keep", "0.6", "--threads", "1",
                             "--output", out_dir, *FAST, "--json")
        assert code == 0, err
        assert json.loads(out)["threads"] == 1
        meta = json.loads((out_dir / "ranklm.json").read_text())
        assert meta["torch_threads"] == 1 and meta["timings"]["torch_threads"] == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("args, match", [
    (["--include", "re:("], "--include 're:(' is not a valid regular expression"),
    (["--exclude", "re:[a-"], "--exclude 're:[a-' is not a valid regular expression"),
    (["--seq-len", "1024"], "--seq-len 1024 is longer than the 256 positions"),
    (["--eval-seq-len", "300"], "--eval-seq-len 300 is longer than the 256 positions"),
    (["--threads", "0"], "--threads must be a positive integer"),
])
def test_bad_input_is_one_line_before_any_work(capsys, tiny_llama_dir, text_file, tmp_path, args, match):
    out_dir = tmp_path / "ckpt"
    base = ["compress", "--model", tiny_llama_dir, "--data", text_file, "--output", out_dir,
            "--calib-windows", "4", "--eval-windows", "2", "--batch-size", "2"]
    if "--seq-len" not in args:
        base += ["--seq-len", "32"]
    if "--eval-seq-len" not in args:
        base += ["--eval-seq-len", "32"]
    code, out, err = run(capsys, *base, *args)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err and "perplexity (dense)" not in err and "dense perplexity" not in err
    assert not out_dir.exists()


def test_evaluate_window_longer_than_positions(capsys, tiny_llama_dir, text_file):
    code, _, err = run(capsys, "evaluate", tiny_llama_dir, "--data", text_file, "--seq-len", "512")
    assert code == 2 and "--seq-len 512 is longer than the 256 positions" in err


def test_checkpoint_given_to_compress_is_refused_before_loading(capsys, tiny_llama_dir, text_file, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    code, _, err = run(capsys, "compress", tiny_llama_dir, "--data", text_file, "--output", ckpt, *FAST, "--no-eval")
    assert code == 0, err
    import ranklm.models

    def no_loading(*a, **k):
        raise AssertionError("the checkpoint was loaded before being refused")

    monkeypatch.setattr(ranklm.models, "load_model", no_loading)
    code, _, err = run(capsys, "compress", ckpt, "--data", text_file, "--output", tmp_path / "again", *FAST)
    assert code == 2 and "is already a ranklm checkpoint" in err
    assert not (tmp_path / "again").exists()


def test_compress_without_output_warns_before_the_work(capsys, tiny_llama_dir, text_file):
    code, out, err = run(capsys, "compress", tiny_llama_dir, "--data", text_file, *FAST, "--no-eval")
    assert code == 0, err
    first = err.splitlines()[0]
    assert first.startswith("warning: no --output given")


def test_generate_refuses_more_tokens_than_positions(capsys, tiny_llama_dir):
    code, out, err = run(capsys, "generate", tiny_llama_dir, "--prompt", "the cat", "--max-new-tokens", "1000")
    assert code == 2 and "longer than the model's 256 positions" in err and out == ""


def test_generate_chat_uses_the_template(capsys, tiny_llama_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    plain = tmp_path / "plain"
    shutil.copytree(tiny_llama_dir, plain)
    code, _, err = run(capsys, "generate", plain, "--prompt", "hi", "--chat", "--max-new-tokens", "2")
    assert code == 2 and "has no chat template" in err

    chat = tmp_path / "chat"
    shutil.copytree(tiny_llama_dir, chat)
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tok.save_pretrained(chat)
    from ranklm.eval import generate as gen

    seen = {}
    real = gen.stream_generate

    def spy(model, tokenizer, prompt, *a, **k):
        seen.update(k)
        return real(model, tokenizer, prompt, *a, **k)

    import ranklm.eval.generate

    orig = ranklm.eval.generate.stream_generate
    ranklm.eval.generate.stream_generate = spy
    try:
        code, out, err = run(capsys, "generate", chat, "--prompt", "hi", "--chat", "--max-new-tokens", "2",
                             "--dtype", "bfloat16")
    finally:
        ranklm.eval.generate.stream_generate = orig
    assert code == 0, err
    assert seen["chat"] is True
    code, out, err = run(capsys, "generate", chat, "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 0 and "--chat applies it" in err


def test_bench_cell_commands_carry_threads_fisher_windows_and_every_eval_text(capsys, tiny_llama_dir, text_file, tmp_path):
    import torch

    main_eval = tmp_path / "main_eval.txt"
    main_eval.write_text(text_file.read_text())
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(text_file.read_text().split())))
    out = tmp_path / "bench"
    before = torch.get_num_threads()
    try:
        code, stdout, err = run(capsys, "bench", tiny_llama_dir, "--data", text_file, "--eval-data", main_eval,
                                "--eval-data", other, "--recipes", "kfac-global", "--keep", "0.6", "--output", out,
                                "--calib-windows", "4", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2",
                                "--batch-size", "2", "--gen-prompts", "0", "--fisher-windows", "3", "--threads", "1")
    finally:
        torch.set_num_threads(before)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    cell = next(r for r in results["rows"] if r["method"] == "kfac-global")
    cmd = cell["command"]
    assert "--fisher-windows 3" in cmd and "--threads 1" in cmd
    assert f"--eval-data {main_eval}" in cmd
    assert "&& ranklm evaluate " in cmd and f"--data {other}" in cmd
    assert "--threads 1" in results["command"]
    dense = next(r for r in results["rows"] if r["method"] == "dense")
    assert f"--data {main_eval} " in dense["command"] and "--threads 1" in dense["command"]


def test_bench_default_recipes_include_the_default_method(capsys):
    code, out, _ = run(capsys, "bench", "--help")
    assert "kfac-global" in " ".join(out.split()).split("--recipes", 1)[1][:200]


def test_missing_optional_extra_is_one_line_naming_it(capsys, tiny_llama_dir, text_file, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    code, out, err = run(capsys, "evaluate", tiny_llama_dir, "--data", text_file, "--seq-len", "32", "--lm-eval", "x")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "pip install 'ranklm[eval]'" in lines[0] and "Traceback" not in err


def test_calib_windows_past_the_text_is_refused_but_the_default_count_is_at_most(capsys, caplog, tiny_llama_dir, text_file,
                                                                                  tmp_path):
    import logging

    caplog.set_level(logging.INFO, logger="ranklm")
    code, _, err = run(capsys, "compress", tiny_llama_dir, "--data", text_file, "--calib-windows", "100000",
                       "--seq-len", "32", "--eval-seq-len", "32", "--output", tmp_path / "o", "--no-eval")
    assert code == 2 and "too short for --calib-windows 100000" in err and not (tmp_path / "o").exists()
    code, out, err = run(capsys, "compress", tiny_llama_dir, "--data", text_file, "--recipe", "svd-llm", "--keep", "0.6",
                         "--seq-len", "128", "--eval-seq-len", "32", "--output", tmp_path / "o", "--no-eval", "--json")
    assert code == 0, err
    assert "calibration: 128 windows of 128 tokens asked for, the text gives" in caplog.text
