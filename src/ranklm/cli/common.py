"""Helpers the commands share: the model argument, threads, devices, window-length checks, text sources, output lines."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import typer

from ..config import parse_option_value
from ..errors import RanklmError


def pick_model(positional: Optional[str], option: Optional[str]) -> Optional[str]:
    """The model named either as the first argument or with ``--model`` (both: they must agree)."""
    if positional is not None and option is not None and positional != option:
        raise RanklmError(f"two models given: {positional!r} as the argument and --model {option!r}; give one")
    return option if option is not None else positional


def given(ctx: typer.Context, name: str, value: Any) -> Any:
    """``value`` if the user gave the option, else None (so ``--keep`` and ``--remove`` together can be refused)."""
    source = ctx.get_parameter_source(name)
    return None if source is not None and source.name == "DEFAULT" else value


def set_threads(threads: Optional[int]) -> int:
    """Apply ``--threads`` (before any torch work) and return the thread count the run uses."""
    import torch

    if threads is not None:
        if threads < 1:
            raise RanklmError("--threads must be a positive integer")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def quiet_libraries() -> None:
    """Keep transformers' info logs and progress bars off stderr, without importing it just for that."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def dtype_arg(name: str):
    """``--dtype`` value -> torch dtype or "auto" (a bad name is a RanklmError before any loading)."""
    from ..models import parse_dtype

    return parse_dtype(name)


def torch_device(name: str):
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise RanklmError(f"unknown --device {name!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RanklmError(f"--device {name}: no CUDA device is available here")
    return dev


def check_positions(model, lengths: dict[str, Optional[int]]) -> None:
    """``architectures.check_positions``, imported when called (``--help`` must not import transformers)."""
    from ..architectures import check_positions as check

    check(model, lengths)


def echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


def eval_sources(data: Optional[str], eval_data: Optional[str]):
    """(calibration source, evaluation source or None) following docs/design.md §2/§9."""
    calib, evald, _ = data_splits(data, eval_data)
    return calib, evald


def data_splits(data: Optional[str], eval_data: Optional[str], validate: bool = False):
    """(calibration, evaluation or None, validation or None), disjoint by document (docs/design.md §13).

    The default corpus: its three parts by speech. ``--data`` alone: calibration as before, its held-out
    documents split into evaluation (the first ones: the same first windows as before) and validation.
    ``--data`` with ``--eval-data``: all of ``--data`` calibrates, unless the run ``validate``s (heal): then
    its held-out documents are the validation part. A held-out part that cannot be split (one document
    with no blank line) stays whole for evaluation; a run that validates is then refused."""
    from ..calibration import read_text_source
    from ..calibration.data import corpus_splits, split_held_out, split_source

    if eval_data is not None and data is not None and Path(eval_data).resolve() == Path(data).resolve():
        raise RanklmError(
            f"--eval-data {eval_data} is the calibration file itself: evaluation text would overlap calibration "
            "(omit --eval-data to split the file by document)"
        )
    val = None
    if data is None or data == "default":
        parts = corpus_splits()
        calib, evald, val = parts.calibration, parts.evaluation, parts.validation
    else:
        calib_all = read_text_source(data)
        if eval_data is None:
            calib, held = split_source(calib_all)
            try:
                evald, val = split_held_out(held)
            except RanklmError:
                if validate:
                    raise
                evald = held
        elif validate:
            calib, val = split_source(calib_all)
            evald = None
        else:
            calib, evald = calib_all, None
    if eval_data is not None:
        evald = corpus_splits().evaluation if eval_data == "default" else read_text_source(eval_data)
    return calib, evald, val


def parse_options(items: list[str], flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict, values parsed as JSON when they are JSON (numbers, true/false, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RanklmError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_option_value(value)
    return out


def fmt_ppl(x: float) -> str:
    return f"{x:,.2f}" if x < 1e6 else f"{x:.3e}"


def is_encoder(model: Optional[str]) -> bool:
    """True for a model without a causal LM head (BERT-like encoders, sequence classifiers, masked LMs)."""
    from ..models import config_is_encoder

    return config_is_encoder(model)


def label2id(model) -> Optional[dict]:
    from ..train.task import model_label2id

    return model_label2id(model)


def one_line(text: str) -> str:
    return " ".join(str(text).split())
