"""The compress driver: load a dense model, cut the windows, run the pipeline, measure, save.

``ranklm compress`` is this function plus option parsing and printing; Python callers that want the
whole job (not only ``ranklm.compress`` on a model already in memory) call ``compress_job``.
Everything that can be refused is refused before the model is loaded or any statistic is computed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..architectures import check_positions, has_lm_head
from ..calibration import TextSource, token_windows
from ..config import CompressConfig
from ..errors import RanklmError
from ..eval import perplexity
from ..io import check_output_dir, save
from ..models import is_checkpoint, load_model, require_tokenizer
from ..pipeline import calibration_info, make_plan, open_run_state, trainer_windows
from ..pipeline import run as run_pipeline
from ..targets import find_targets
from .parallel import join, leave


@dataclass
class CompressJob:
    """What a compress run needs besides its ``CompressConfig``: where the model and texts come from,
    how it is evaluated, and where (whether) it is saved."""

    model: str | None = None  # a folder or cached hub id; None = the packaged default model
    calib_source: TextSource | None = None  # None = the packaged corpus's calibration part
    eval_source: TextSource | None = None  # None = no perplexity
    val_source: TextSource | None = None  # validation text (heal); None with the default corpus = its validation part
    eval_windows: int = 40
    eval_seq_len: int = 512
    calib_strict: bool = False  # True when the window count was given: exactly that many or an error
    output: str | os.PathLike | None = None
    overwrite: bool = False
    dtype: Any = "auto"
    device: Any = "cpu"
    device_map: Any = None
    state_dir: str | os.PathLike | None = None
    resume: bool = False
    save_every: int = 50
    log: Callable[[str], None] = field(default=lambda line: None, repr=False)

    def __post_init__(self) -> None:
        for name in ("eval_seq_len", "eval_windows", "save_every"):
            if int(getattr(self, name)) < 1:
                raise RanklmError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.resume and self.state_dir is None:
            raise RanklmError("--resume needs --state-dir (the folder the interrupted run saved its state in)")
        if self.device_map is not None and str(self.device) != "cpu":
            raise RanklmError("give --device or --device-map, not both")


@dataclass
class CompressOutcome:
    model: Any
    tokenizer: Any
    config: CompressConfig  # as run (the default recipe may have been resolved for the model)
    evaluation: dict[str, Any]
    seconds: float  # the pipeline's own time (statistics, allocation, install, training)


def compress_job(config: CompressConfig, job: CompressJob) -> CompressOutcome:
    """Run one compression end to end; the returned model carries ``model.ranklm`` (saved when ``job.output``)."""
    log = job.log
    if config.keep >= 1.0 and config.quantize is None and config.budget_bytes is None:
        raise RanklmError("--keep 1.0 keeps every target dense: nothing to compress, no output written "
                          "(with --quantize intN it is plain weight-only quantization)")
    if job.model is not None and is_checkpoint(job.model):
        raise RanklmError(f"{job.model} is already a ranklm checkpoint: compress starts from a dense model "
                          "(export it with `ranklm export --dense` first to compress it again)")
    if job.output is not None:
        check_output_dir(job.output, job.overwrite)
    if job.calib_source is None:
        from ..calibration.data import corpus_splits

        parts = corpus_splits()
        job.calib_source = parts.calibration
        job.val_source = job.val_source or parts.validation

    t0 = time.perf_counter()
    rank, world, device = join(job.device)  # torchrun / accelerate launch: windows shared, statistics all-reduced
    if world > 1:
        log(f"process {rank} of {world}: calibration batches shared, statistics all-reduced; rank 0 writes")
    m, tok, info = load_model(job.model, dtype=job.dtype, device=device, device_map=job.device_map)
    log(f"loaded {info['name_or_path']} ({sum(p.numel() for p in m.parameters()):,} params, {info['dtype']}) "
        f"in {time.perf_counter() - t0:.1f}s")
    tok = require_tokenizer(tok, info.get("path", str(job.model)))
    is_lm = has_lm_head(m)
    evaluate = job.eval_source is not None and is_lm
    check_positions(m, {"--seq-len": config.seq_len, "--eval-seq-len": job.eval_seq_len if evaluate else None})
    resolved = config.for_model(m)
    if resolved is not config:
        resolved.validate_options(from_cli=True)
        log(f"default recipe: {resolved.recipe} ({type(m).__name__} has no LM head; "
            "kfac-global needs an LM loss through the whole model)")
        config = resolved
    plan = make_plan(config)
    find_targets(m, config.include, config.exclude)  # fail on bad patterns before any long work
    calib = None  # --keep 1 --quantize intN reads no calibration text
    if not plan.quantize_only:
        calib = token_windows(tok, job.calib_source, config.seq_len, config.calib_windows, seed=config.seed,
                              strict=job.calib_strict)

    evaluation: dict[str, Any] = {}
    eval_windows = None
    if job.eval_source is not None and not is_lm:
        log(f"{type(m).__name__} has no LM head: skipping perplexity (encoders are evaluated by task accuracy)")
    if evaluate:
        eval_windows = token_windows(tok, job.eval_source, job.eval_seq_len, job.eval_windows, purpose="evaluation")
        dense = perplexity(m, eval_windows, config.batch_size, desc="perplexity (dense)")
        evaluation.update(dense=dense.to_dict(), data=job.eval_source.description)
        log(f"dense perplexity: {dense}")

    validation = None
    if getattr(plan.trainer, "validates", False):
        validation = validation_windows(tok, job, config.seq_len)
        used = min(len(validation), int(getattr(plan.trainer, "val_windows", len(validation))))
        log(f"validation: {used} of {len(validation)} windows x {validation.shape[1]} tokens ({job.val_source.description})")

    train_windows = None  # a trainer that trains on more of the calibration text than the statistics read (heal)
    if calib is not None:
        train_windows = trainer_windows(tok, job.calib_source, config.seq_len, len(calib),
                                        int(getattr(plan.trainer, "windows", 0) or 0), config.seed)
        if train_windows is not None:
            log(f"{plan.trainer.name} trains on {len(train_windows)} windows x {config.seq_len} tokens: the "
                f"{len(calib)} calibration windows and {len(train_windows) - len(calib)} more of the calibration text")

    if job.state_dir is not None:
        if not open_run_state(job.state_dir, job.resume, plan, info, calib):
            log(f"--state-dir: this run trains nothing (no learning allocator, no --trainer); "
                f"only {job.state_dir}/run.json is written")
        elif job.resume:
            found = sorted(p.name for p in Path(job.state_dir).glob("*.safetensors"))
            log(f"resuming from {job.state_dir}: "
                + (", ".join(found) if found else "no training state saved yet (starting training afresh)"))

    t1 = time.perf_counter()
    run_pipeline(m, tok, plan, data=calib, base_model=info,
                 calibration=None if calib is None else calibration_info(job.calib_source.description, calib,
                                                                          plan.calibration),
                 state_dir=job.state_dir, resume=job.resume, save_every=job.save_every, validation=validation,
                 train_windows=train_windows)
    seconds = time.perf_counter() - t1
    if eval_windows is not None:
        evaluation["compressed"] = perplexity(m, eval_windows, config.batch_size, desc="perplexity (compressed)").to_dict()
        m.ranklm.evaluation = evaluation
    if job.output is not None and rank == 0:
        save(m, tok, job.output, overwrite=job.overwrite)
    if world > 1:
        leave()
    return CompressOutcome(m, tok, config, evaluation, seconds)


def validation_windows(tokenizer, job: CompressJob, seq_len: int) -> Any:
    """Every window of the validation text (``job.val_source``; the default corpus's validation part when the
    job calibrates on the default corpus)."""
    if job.val_source is None:
        raise RanklmError(f"{job.calib_source.description}: the trainer validates, and no validation text was given "
                          "(CompressJob.val_source; ranklm compress splits --data into calibration, evaluation and validation)")
    return token_windows(tokenizer, job.val_source, seq_len, None, purpose="validation")


def summary(outcome: CompressOutcome, job: CompressJob, threads: int | None = None) -> dict[str, Any]:
    """The run's one-object summary (``ranklm compress --json``)."""
    st, config, evaluation = outcome.model.ranklm, outcome.config, outcome.evaluation
    out = {
        "method": st.method,
        "base": config.base,
        "allocator": config.allocator,
        "trainer": config.trainer,
        "keep_requested": st.keep_requested,
        "keep_achieved": st.keep_achieved,
        "keep_achieved_model": st.keep_achieved_model,
        "compress_seconds": round(outcome.seconds, 2),
        "output": str(job.output) if job.output else None,
        **{f"ppl_{k}": v["ppl"] for k, v in evaluation.items() if isinstance(v, dict)},
        "eval_windows": evaluation.get("dense", {}).get("windows"),
        "eval_tokens": evaluation.get("dense", {}).get("tokens"),
        "seq_len": config.seq_len,
        "eval_seq_len": job.eval_seq_len,
        "threads": threads,
    }
    from ..quantize.sizes import bytes_summary

    out.update(bytes_summary(outcome.model))
    quant = (st.artifacts or {}).get("quantization")
    if quant:
        out["quantize"] = {"bits": sorted(set(quant["bits"].values())), "group_size": quant["group_size"]}
    learned = [r for r in st.training if "keep_learned" in r]
    if learned:
        out.update(keep_learned=learned[-1]["keep_learned"], reached_budget=learned[-1].get("reached_budget"))
        if "prefix_fraction" in learned[-1]:
            out["prefix_fraction"] = learned[-1]["prefix_fraction"]
    return out


__all__ = ["CompressJob", "CompressOutcome", "compress_job", "summary"]
