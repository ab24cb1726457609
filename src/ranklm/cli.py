"""``ranklm`` command line (typer): compress, evaluate, info, export, bench, generate, finetune, plot.

Every user mistake surfaces as ``error: <one line>`` on stderr with exit code 2
and nothing written; progress bars go to stderr, ``--json`` output to stdout.
Printing ``--help`` or ``--version`` imports neither torch nor transformers: every
command imports what it needs inside its body.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import typer

from ._version import __version__
from .config import DEFAULT_KEEP, parse_option_value
from .errors import RanklmError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain click help: brackets in help strings stay text, defaults show as [default: ...]
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Low-rank compression of transformer language models with adaptive rank selection.",
)

DEFAULT_MODEL_HELP = "packaged SmolLM2-135M-Instruct"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ranklm {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the ranklm version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """Low-rank compression of transformer language models with adaptive rank selection."""


# ----------------------------------------------------------------------------- options shared by commands
# One definition per option that several commands take, so the spelling, meaning and default cannot drift.


def model_argument(what: str = "HF model folder, hub id or ranklm checkpoint") -> Any:
    return typer.Argument(None, help=f"{what} (or give it as --model).", show_default=DEFAULT_MODEL_HELP,
                          metavar="[MODEL]")


def model_option(what: str = "HF model folder, hub id or ranklm checkpoint", default_help: str = DEFAULT_MODEL_HELP) -> Any:
    return typer.Option(None, "--model", "-m", help=f"{what} (or give it as the first argument).", show_default=default_help)


def threads_option() -> Any:
    return typer.Option(None, "--threads", help="torch CPU threads; results can depend on it, so it is recorded in "
                        "ranklm.json and in printed commands.", show_default="torch's default (the number of cores)")


def device_option(what: str) -> Any:
    return typer.Option("cpu", "--device", help=f"torch device to {what} on: cpu, cuda, cuda:1, ...")


def dtype_option(what: str) -> Any:
    return typer.Option("auto", "--dtype", help=f"{what}: auto (the folder's or checkpoint's own), float32, bfloat16, float16.")


def _pick_model(positional: Optional[str], option: Optional[str]) -> Optional[str]:
    """The model named either as the first argument or with ``--model`` (both: they must agree)."""
    if positional is not None and option is not None and positional != option:
        raise RanklmError(f"two models given: {positional!r} as the argument and --model {option!r}; give one")
    return option if option is not None else positional


def _given(ctx: typer.Context, name: str, value: Any) -> Any:
    """``value`` if the user gave the option, else None (so ``--keep`` and ``--remove`` together can be refused)."""
    source = ctx.get_parameter_source(name)
    return None if source is not None and source.name == "DEFAULT" else value


def _set_threads(threads: Optional[int]) -> int:
    """Apply ``--threads`` (before any torch work) and return the thread count the run uses."""
    import torch

    if threads is not None:
        if threads < 1:
            raise RanklmError("--threads must be a positive integer")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _quiet_libraries() -> None:
    """Keep transformers' info logs and progress bars off stderr, without importing it just for that."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _dtype(name: str):
    """``--dtype`` value -> torch dtype or "auto" (a bad name is a RanklmError before any loading)."""
    from .models import parse_dtype

    return parse_dtype(name)


def _torch_device(name: str):
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise RanklmError(f"unknown --device {name!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RanklmError(f"--device {name}: no CUDA device is available here")
    return dev


def _check_positions(model, lengths: dict[str, Optional[int]]) -> None:
    """Refuse a window length the model has no positions for (before any statistics or evaluation)."""
    from .architectures import max_positions

    limit = max_positions(model.config)
    if limit is None:
        return
    for flag, n in lengths.items():
        if n is not None and n > limit:
            raise RanklmError(f"{flag} {n} is longer than the {limit} positions {type(model).__name__} has "
                              f"(max_position_embeddings): use {flag} {limit} or less")


def _echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


def _eval_sources(data: Optional[str], eval_data: Optional[str]):
    """(calibration source, evaluation source or None) following docs/design.md §2/§9."""
    from .calibration import default_corpus, read_text_source, split_source

    if eval_data is not None and data is not None and Path(eval_data).resolve() == Path(data).resolve():
        raise RanklmError(
            f"--eval-data {eval_data} is the calibration file itself: evaluation text would overlap calibration "
            "(omit --eval-data to split the file by document)"
        )
    if data is None or data == "default":
        calib, evald = default_corpus()
    else:
        calib_all = read_text_source(data)
        if eval_data is None:
            calib, evald = split_source(calib_all)
        else:
            calib, evald = calib_all, None
    if eval_data is not None:
        evald = default_corpus()[1] if eval_data == "default" else read_text_source(eval_data)
    return calib, evald


def parse_options(items: list[str], flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict, values parsed as JSON when they are JSON (numbers, true/false, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RanklmError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_option_value(value)
    return out


def _fmt_ppl(x: float) -> str:
    return f"{x:,.2f}" if x < 1e6 else f"{x:.3e}"


@app.command()
def compress(
    ctx: typer.Context,
    model_arg: Optional[str] = model_argument(),
    keep: float = typer.Option(DEFAULT_KEEP, "--keep", help="Fraction of the targets' parameters to keep, in (0, 1]."),
    remove: Optional[float] = typer.Option(None, "--remove", help="Fraction to remove (= 1 - keep)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Named method (see `ranklm methods`): svd, svd-llm, svd-llm-v2, fwsvd, tfwsvd, asvd, svd-energy, svd-llm-energy, kfac-global.", show_default="kfac-global for causal LMs; svd-llm for encoders or with --sequential"),
    base: Optional[str] = typer.Option(None, "--base", help="Base decomposition: svd, whiten, kfac, fwsvd, tfwsvd, asvd; overrides the recipe."),
    allocator: Optional[str] = typer.Option(None, "--allocator", help="Rank allocator: uniform, energy, loss, global, sensitivity, ars, softlm; overrides the recipe."),
    trainer: str = typer.Option("none", "--trainer", help="Training after installation: none or finetune."),
    model: Optional[str] = model_option("HF model folder or hub id to compress"),
    data: Optional[str] = typer.Option(None, "--data", help="Calibration text: a text file, folder, .jsonl or .csv (its text column).", show_default="packaged convention speeches"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Evaluation text: a file, folder, .jsonl, .csv, 'hamlet' (packaged) or 'default'.", show_default="held-out part of --data"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Checkpoint directory to write (atomically)."),
    include: list[str] = typer.Option([], "--include", help="Glob (or re:REGEX) on module names to compress; repeatable."),
    exclude: list[str] = typer.Option([], "--exclude", help="Glob (or re:REGEX) on module names to leave dense; repeatable."),
    calib_windows: Optional[int] = typer.Option(None, "--calib-windows", help="Calibration windows.", show_default="128; 32 for the learning allocators ars and softlm, whose training dominates the run"),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration window."),
    eval_seq_len: int = typer.Option(512, "--eval-seq-len", help="Tokens per evaluation window."),
    eval_windows: int = typer.Option(40, "--eval-windows", help="Evaluation windows for the dense/compressed perplexity."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the perplexity evaluation."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass (and per training step unless a method's batch_size option says otherwise)."),
    seed: int = typer.Option(0, "--seed", help="Seed for window selection and anything random."),
    base_opt: list[str] = typer.Option([], "--base-opt", help="Base option KEY=VALUE (see `ranklm methods`), e.g. side=in; repeatable."),
    alloc_opt: list[str] = typer.Option([], "--alloc-opt", help="Allocator option KEY=VALUE (see `ranklm methods`), e.g. steps=300; repeatable."),
    train_opt: list[str] = typer.Option([], "--train-opt", help="Trainer option KEY=VALUE (see `ranklm methods`), e.g. steps=100, lr=1e-4; repeatable."),
    fisher_windows: int = typer.Option(32, "--fisher-windows", help="Calibration windows used for gradient statistics (fwsvd/tfwsvd Fisher, kfac output gradients)."),
    min_rank: int = typer.Option(1, "--min-rank", help="Smallest rank a factored target may get from the allocator."),
    round_to: int = typer.Option(1, "--round-to", help="Round factored ranks to multiples of this (e.g. 8, 16, 32: GEMM-friendly shapes) after allocation, keep ratio still within 0.5 % below --keep; 1 = off."),
    max_flop_ratio: float = typer.Option(1.0, "--max-flop-ratio", help="Latency-aware rule: a target whose factored form would keep more than this fraction of its dense FLOPs (rank*(m+n) > ratio*m*n; two thin GEMMs near break-even are slower than one dense GEMM) is kept dense when the budget pays for it, else cut below the ratio; freed parameters go to the other targets; keep never rises above --keep; 1 = off, e.g. 0.6.", min=0.0, max=1.0),
    sequential: Optional[bool] = typer.Option(None, "--sequential/--whole-model", help="Block-by-block calibration (memory ~ model + one block's statistics) and refit of the allocated ranks on compressed activations.", show_default="on for whiten/asvd"),
    propagate: str = typer.Option("compressed", "--propagate", help="With --sequential: later blocks see the 'compressed' (refit) or 'dense' outputs."),
    dtype: str = dtype_option("Model dtype while compressing/evaluating and in the saved checkpoint (statistics and factorizations stay float32/float64)"),
    device: str = device_option("load the model and compress"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="accelerate device map for big models: auto, a device, or JSON {module: device} (CPU/disk offload allowed; offloaded layers are compressed and run on the CPU); replaces --device."),
    threads: Optional[int] = threads_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Save resumable training state (learning allocators, trainers) here every --save-every steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run whose state is in --state-dir (same command otherwise)."),
    save_every: int = typer.Option(50, "--save-every", help="Training steps between state saves with --state-dir."),
) -> None:
    """Compress a model to a keep ratio and save it as a ranklm checkpoint."""
    from .calibration import token_windows
    from .config import AUTO, CompressConfig, resolve_keep
    from .eval import perplexity
    from .io import check_output_dir, save
    from .models import is_checkpoint, load_model, require_tokenizer
    from .pipeline import calibration_info, learning_summary, open_run_state, run_warnings
    from .pipeline import run as run_pipeline

    model = _pick_model(model_arg, model)
    threads_used = _set_threads(threads)
    ratio = resolve_keep(_given(ctx, "keep", keep), remove)
    config = CompressConfig(
        keep=ratio,
        recipe=recipe if recipe is not None else (None if (base or allocator) else AUTO),
        base=base,
        allocator=allocator,
        include=list(include),
        exclude=list(exclude),
        calib_windows=calib_windows,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        fisher_windows=fisher_windows,
        min_rank=min_rank,
        round_to=round_to,
        max_flop_ratio=max_flop_ratio,
        sequential=sequential,
        propagate=propagate,
        base_options=parse_options(base_opt, "--base-opt"),
        allocator_options=parse_options(alloc_opt, "--alloc-opt"),
        trainer=trainer,
        trainer_options=parse_options(train_opt, "--train-opt"),
    )
    config.validate_options(from_cli=True)
    if config.keep >= 1.0:
        raise RanklmError("--keep 1.0 keeps every target dense: nothing to compress, no output written")
    for name, v in (("eval-seq-len", eval_seq_len), ("eval-windows", eval_windows)):
        if v < 1:
            raise RanklmError(f"--{name} must be a positive integer")
    if resume and state_dir is None:
        raise RanklmError("--resume needs --state-dir (the folder the interrupted run saved its state in)")
    if save_every < 1:
        raise RanklmError("--save-every must be a positive integer")
    if model is not None and is_checkpoint(model):
        raise RanklmError(f"{model} is already a ranklm checkpoint: compress starts from a dense model "
                          "(export it with `ranklm export --dense` first to compress it again)")
    if output is not None:
        check_output_dir(output, overwrite)
    else:
        _echo_err("warning: no --output given: the compressed model is measured but not saved")
    torch_device = _torch_device(device)
    if device_map is not None and device != "cpu":
        raise RanklmError("give --device or --device-map, not both")
    calib_src, eval_src = _eval_sources(data, eval_data)

    t0 = time.perf_counter()
    m, tok, info = load_model(model, dtype=_dtype(dtype), device=torch_device, device_map=device_map)
    _echo_err(f"loaded {info['name_or_path']} ({sum(p.numel() for p in m.parameters()):,} params, {info['dtype']}) in {time.perf_counter() - t0:.1f}s")
    tok = require_tokenizer(tok, info.get("path", str(model)))
    _check_positions(m, {"--seq-len": seq_len, "--eval-seq-len": None if no_eval else eval_seq_len})
    from .targets import find_targets

    resolved = config.for_model(m)
    if resolved is not config:
        resolved.validate_options(from_cli=True)
        _echo_err(f"default recipe: {resolved.recipe} ({type(m).__name__} has no LM head; "
                  "kfac-global needs an LM loss through the whole model)")
        config = resolved
    find_targets(m, config.include, config.exclude)  # fail on bad patterns before any long work
    # --calib-windows given: exactly that many or an error; the default count: at most that many (said in a log line)
    calib = token_windows(tok, calib_src, config.seq_len, config.calib_windows, seed=config.seed,
                          strict=calib_windows is not None)
    evaluation: dict[str, Any] = {}
    eval_windows_t = None
    from .architectures import has_lm_head

    is_lm = has_lm_head(m)
    if not no_eval and eval_src is not None and not is_lm:
        _echo_err(f"{type(m).__name__} has no LM head: skipping perplexity (encoders are evaluated by task accuracy)")
    if not no_eval and eval_src is not None and is_lm:
        eval_windows_t = token_windows(tok, eval_src, eval_seq_len, eval_windows, purpose="evaluation")
        dense = perplexity(m, eval_windows_t, batch_size, desc="perplexity (dense)")
        evaluation["dense"] = dense.to_dict()
        evaluation["data"] = eval_src.description
        _echo_err(f"dense perplexity: {dense}")

    if state_dir is not None:
        trains = open_run_state(state_dir, resume, config, info, calib)
        if not trains:
            _echo_err(f"--state-dir: this run trains nothing (no learning allocator, no --trainer); only {state_dir}/run.json is written")
        elif resume:
            found = sorted(p.name for p in Path(state_dir).glob("*.safetensors"))
            _echo_err(f"resuming from {state_dir}: {', '.join(found) if found else 'no training state saved yet (starting training afresh)'}")

    t1 = time.perf_counter()
    run_pipeline(m, tok, config, data=calib, base_model=info, calibration=calibration_info(calib_src.description, calib, config),
                 state_dir=state_dir, resume=resume, save_every=save_every)
    elapsed = time.perf_counter() - t1
    st = m.ranklm
    if eval_windows_t is not None:
        comp = perplexity(m, eval_windows_t, batch_size, desc="perplexity (compressed)")
        evaluation["compressed"] = comp.to_dict()
        st.evaluation = evaluation
    if output is not None:
        save(m, tok, output, overwrite=overwrite)
    learned = [r for r in st.training if "keep_learned" in r]
    summary = {
        "method": st.method,
        "base": config.base,
        "allocator": config.allocator,
        "trainer": config.trainer,
        "keep_requested": st.keep_requested,
        "keep_achieved": st.keep_achieved,
        "keep_achieved_model": st.keep_achieved_model,
        "compress_seconds": round(elapsed, 2),
        "output": str(output) if output else None,
        **{f"ppl_{k}": v["ppl"] for k, v in evaluation.items() if isinstance(v, dict)},
        "eval_windows": evaluation.get("dense", {}).get("windows"),
        "eval_tokens": evaluation.get("dense", {}).get("tokens"),
        "seq_len": config.seq_len,
        "eval_seq_len": eval_seq_len,
        "threads": threads_used,
    }
    if learned:
        summary.update(keep_learned=learned[-1]["keep_learned"], reached_budget=learned[-1].get("reached_budget"))
        if "prefix_fraction" in learned[-1]:
            summary["prefix_fraction"] = learned[-1]["prefix_fraction"]
    for line in learning_summary(st):
        _echo_err(line)
    for warning in run_warnings(st):
        _echo_err(warning)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(f"method            {st.method} (base {config.base}, allocator {config.allocator}, trainer {config.trainer})")
    typer.echo(f"keep (targets)    requested {st.keep_requested:.4f}, achieved {st.keep_achieved:.4f}")
    for r in learned:
        typer.echo(f"keep learned      {r['keep_learned']:.4f} ({r['trainer']}, before the exact fit)"
                   + (f"; top-k prefix masks {r['prefix_fraction']:.0%}" if "prefix_fraction" in r else ""))
    typer.echo(f"keep (whole model) {st.keep_achieved_model:.4f}  ({st.params['model_compressed']:,} / {st.params['model_dense']:,} params)")
    typer.echo(f"compression time  {elapsed:.1f}s")
    if "dense" in evaluation:
        d, c = evaluation["dense"], evaluation["compressed"]
        typer.echo(
            f"perplexity        dense {_fmt_ppl(d['ppl'])}  ->  compressed {_fmt_ppl(c['ppl'])}  "
            f"({d['windows']} windows x {d['seq_len']} tokens, {d['tokens']} predicted tokens; {eval_src.description})"
        )
    typer.echo(f"saved             {output}" if output else "saved             (no --output given: nothing written)")


@app.command()
def evaluate(
    model_arg: Optional[str] = model_argument("Checkpoint or HF model folder"),
    model: Optional[str] = model_option("Checkpoint or HF model folder"),
    data: Optional[str] = typer.Option(None, "--data", help="Text file/folder/.jsonl/.csv, 'hamlet' or 'default'.", show_default="evaluation part of the packaged corpus"),
    windows: Optional[int] = typer.Option(None, "--windows", help="At most this many windows.", show_default="all"),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    latency: bool = typer.Option(False, "--latency", help="Checkpoint: median forward speed-up vs its dense counterpart (factors merged), next to the FLOP-ratio limit."),
    latency_shapes: str = typer.Option("1x128,1x512,8x128,8x512", "--latency-shapes", help="With --latency: BATCHxSEQ list."),
    latency_reps: int = typer.Option(10, "--latency-reps", help="With --latency: timed repetitions per model and shape (interleaved)."),
    latency_warmup: int = typer.Option(2, "--latency-warmup", help="With --latency: untimed warm-up passes per model and shape."),
    decode_tokens: str = typer.Option("128x128", "--decode-tokens", help="With --latency: decode speed at batch 1 with a KV cache, PROMPTxNEW tokens (0 = skip)."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="With --latency on a GPU: time forwards and decode steps replayed from CUDA graphs (static KV cache), free of launch and Python overhead."),
    dtype: str = dtype_option("Run the model in this dtype"),
    device: str = device_option("evaluate (perplexity and --latency)"),
    threads: Optional[int] = threads_option(),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="Comma-separated lm-evaluation-harness tasks (needs pip install 'ranklm[eval]')."),
    lm_eval_include: Optional[Path] = typer.Option(None, "--lm-eval-include", help="With --lm-eval: folder of custom task YAMLs."),
    lm_eval_limit: Optional[float] = typer.Option(None, "--lm-eval-limit", help="With --lm-eval: at most this many documents per task."),
    task: Optional[str] = typer.Option(None, "--task", help="Classifiers: accuracy and macro-F1 on the test split of a task (rotten-tomatoes or a text,label CSV/JSONL file) instead of perplexity."),
    max_length: int = typer.Option(64, "--max-length", help="With --task: tokens per example (longer ones are truncated)."),
) -> None:
    """Token perplexity of a model or checkpoint (docs/design.md §2); optionally speed-up and lm-eval tasks.

    With ``--task``: accuracy and macro-F1 of a sequence classifier (a ``ranklm finetune`` checkpoint)."""
    model = _pick_model(model_arg, model)
    threads_used = _set_threads(threads)
    if task is not None:
        _evaluate_task(model, task, max_length, batch_size, as_json)
        return
    from .calibration import default_corpus, read_text_source, token_windows
    from .eval import perplexity
    from .models import load_model, require_tokenizer

    if windows is not None and windows < 1:
        raise RanklmError("--windows must be a positive integer")
    src = default_corpus()[1] if data is None or data == "default" else read_text_source(data)
    shapes = None
    if latency:
        from .eval.latency import parse_decode_tokens, parse_shapes

        shapes = parse_shapes(latency_shapes)
        decode = parse_decode_tokens(decode_tokens)
        if latency_reps < 1 or latency_warmup < 0:
            raise RanklmError("--latency-reps must be >= 1 and --latency-warmup >= 0")
    if cuda_graphs and (not latency or _torch_device(device).type != "cuda"):
        raise RanklmError("--cuda-graphs needs --latency and --device cuda")
    if lm_eval is not None:
        from .eval.lm_eval_bridge import _require_lm_eval

        _require_lm_eval()
    m, tok, info = load_model(model, dtype=_dtype(dtype), device=_torch_device(device))
    tok = require_tokenizer(tok, str(model or "the default model"))
    _check_positions(m, {"--seq-len": seq_len})
    ids = token_windows(tok, src, seq_len, windows, purpose="evaluation")
    res = perplexity(m, ids, batch_size)
    out = {
        **res.to_dict(),
        "params": sum(p.numel() for p in m.parameters()),
        "model": info["name_or_path"],
        "data": src.description,
        "dtype": info["dtype"],
        "device": str(next(m.parameters()).device),
        "threads": threads_used,
    }
    state = getattr(m, "ranklm", None)
    if state is not None:
        out.update(method=state.method, keep_achieved=state.keep_achieved, keep_achieved_model=state.keep_achieved_model)
    lat = None
    if shapes is not None:
        from .eval.latency import dense_counterpart, measure_decode, measure_latency, tensor_core_note
        from .layers import LowRankLinear

        if not any(isinstance(x, LowRankLinear) for x in m.modules()):
            raise RanklmError(f"--latency compares a ranklm checkpoint with its dense counterpart; {info['name_or_path']} is not compressed")
        note = tensor_core_note(m, next(m.parameters()).device, next(m.parameters()).dtype)
        if note:
            _echo_err(note)
        dense = dense_counterpart(m)
        lat = measure_latency(dense, m, shapes, latency_reps, latency_warmup, cuda_graphs=cuda_graphs)
        if decode is not None:
            lat.decode = measure_decode(dense, m, *decode, reps=latency_reps, warmup=latency_warmup, cuda_graphs=cuda_graphs)
            out.update(decode_speedup=lat.decode.speedup, decode_limit=lat.decode.limit)
        out.update(speedup=lat.speedup, flop_ratio_limit=lat.flop_ratio_limit, latency=lat.to_dict())
    if lm_eval is not None:
        from .eval.lm_eval_bridge import lm_eval_tasks

        limit = None if lm_eval_limit is None else (int(lm_eval_limit) if lm_eval_limit >= 1 else lm_eval_limit)
        out["lm_eval"] = lm_eval_tasks(m, tok, lm_eval.split(","), include_path=lm_eval_include, limit=limit,
                                       batch_size=batch_size)
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"{info['name_or_path']}: {res}  params {out['params']:,}  data: {src.description}")
        if lat is not None:
            typer.echo(lat.table())
            h = lat.headline
            typer.echo(f"speed-up {h.speedup:.2f}x (batch {h.batch}, seq {h.seq_len}) vs FLOP-ratio limit {lat.flop_ratio_limit:.2f}x")
        for task, metrics in out.get("lm_eval", {}).items():
            typer.echo(f"lm-eval {task}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


def _evaluate_task(model: Optional[str], task_spec: str, max_length: int, batch_size: int, as_json: bool) -> None:
    from .models import load_classifier, require_tokenizer
    from .tasks import load_task
    from .train.task import evaluate_task

    if max_length < 1 or batch_size < 1:
        raise RanklmError("--max-length and --batch-size must be positive integers")
    task = load_task(task_spec)
    m, tok, info_ = load_classifier(model, task.label_names)
    tok = require_tokenizer(tok, str(model or "the default encoder"))
    res = evaluate_task(m, tok, task, "test", max_length, batch_size=max(batch_size, 1) * 16)
    out = {"accuracy": res.accuracy, "macro_f1": res.macro_f1, "examples": res.examples, "per_class_f1": res.per_class_f1,
           "task": task.name, "split": "test", "split_sizes": task.sizes, "model": info_["name_or_path"],
           "params": sum(p.numel() for p in m.parameters())}
    state = getattr(m, "ranklm", None)
    if state is not None:
        out.update(method=state.method, keep_achieved=state.keep_achieved, keep_achieved_model=state.keep_achieved_model)
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"{info_['name_or_path']}: {res} ({task.name} test split)  params {out['params']:,}")


@app.command()
def info(
    checkpoint: Optional[str] = typer.Argument(None, help="A ranklm checkpoint (or, with --diagnose, a model; or give it as --model).", show_default="packaged model with --diagnose", metavar="[MODEL]"),
    model: Optional[str] = model_option("A ranklm checkpoint (or, with --diagnose, a model)", "packaged model with --diagnose"),
    as_json: bool = typer.Option(False, "--json", help="Print ranklm.json's summary and rank map as JSON."),
    diagnose_: bool = typer.Option(False, "--diagnose", help="Predict per layer and overall which base decomposition loses least, and whether plain SVD will hurt badly."),
    data: Optional[str] = typer.Option(None, "--data", help="With --diagnose: calibration text (encoders: a task).", show_default="packaged corpus"),
    keep: float = typer.Option(0.6, "--keep", help="With --diagnose: keep ratio at which to compare the bases."),
    windows: int = typer.Option(8, "--windows", help="With --diagnose: Fisher windows."),
    seq_len: int = typer.Option(256, "--seq-len", help="With --diagnose: tokens per window."),
) -> None:
    """Recipe, keep ratios and the rank map of a checkpoint; or --diagnose a model.

    The checkpoint is validated as ``ranklm.load``/``evaluate`` validate it (ranklm.json, file
    hashes, rank map against the model's structure) before anything is printed.
    """
    from .budget import kept_fraction
    from .io import check_checkpoint

    checkpoint = _pick_model(checkpoint, model)
    if diagnose_:
        _diagnose(checkpoint, data, keep, windows, seq_len, as_json)
        return
    if checkpoint is None:
        raise RanklmError("give a checkpoint directory (or --diagnose MODEL)")
    meta = check_checkpoint(checkpoint)
    if as_json:
        typer.echo(json.dumps(meta, indent=2))
        return

    def ratio(key: str) -> str:
        return "n/a" if meta.get(key) is None else f"{meta[key]:.4f}"

    r = meta.get("recipe") or {}
    typer.echo(f"checkpoint   {checkpoint}")
    typer.echo(f"base model   {(meta.get('base_model') or {}).get('name_or_path')}")
    typer.echo(f"method       {r.get('name')} (base {r.get('base')}, allocator {r.get('allocator')}, seed {r.get('seed')})")
    typer.echo(
        f"keep         targets: requested {ratio('keep_requested')}, achieved {ratio('keep_achieved')}; "
        f"whole model: {ratio('keep_achieved_model')}"
    )
    cal = meta.get("calibration") or {}
    if cal:
        typer.echo(f"calibration  {cal.get('windows')} x {cal.get('seq_len')} tokens from {cal.get('source')}")
    ev = meta.get("evaluation") or {}
    if "dense" in ev:
        typer.echo(f"perplexity   dense {_fmt_ppl(ev['dense']['ppl'])} -> compressed {_fmt_ppl(ev['compressed']['ppl'])}")
    typer.echo("")
    typer.echo(f"{'module':<48} {'shape':>12} {'rank':>6} {'kept':>7}")
    for name, rank in meta["rank_map"].items():
        mod = meta["modules"][name]
        m, n = mod["out"], mod["in"]
        kept = kept_fraction(m, n, rank)
        typer.echo(f"{name:<48} {f'{m}x{n}':>12} {str(rank):>6} {kept:>7.3f}")


def _diagnose(model: Optional[str], data: Optional[str], keep: float, windows: int, seq_len: int, as_json: bool) -> None:
    from .calibration import default_corpus, read_text_source, token_windows
    from .calibration.fisher import collect_curvature
    from .config import resolve_keep
    from .diagnose import diagnose
    from .models import load_model, require_tokenizer
    from .targets import find_targets

    keep = resolve_keep(keep, None)
    # One forward/backward per window collects everything every base needs (Fisher, input Gram, |x|,
    # output-gradient Gram), so the bases are compared on the same windows.
    if _is_encoder(model):
        # Encoders: Fisher of the task loss (the FWSVD/TFWSVD papers' setting); --data names the task
        # (rotten-tomatoes or a text,label file); as many examples as the decoder default's tokens.
        from .models import load_classifier
        from .tasks import load_task
        from .train.task import DEFAULT_MAX_LENGTH, task_objective

        task = load_task(data)
        m, tok, info_ = load_classifier(model, task.label_names)
        tok = require_tokenizer(tok, str(model or "the default encoder"))
        objective = task_objective(task, tok, DEFAULT_MAX_LENGTH, "train", _label2id(m))
        n = max(1, min(len(objective), windows * seq_len // DEFAULT_MAX_LENGTH))
        targets = find_targets(m)
        fisher, stats = collect_curvature(m, targets, objective.examples["input_ids"][:n], loss_fn=objective)
        what = f"{n} {task.name} train examples, task loss"
    else:
        m, tok, info_ = load_model(model)
        tok = require_tokenizer(tok, str(model or "the default model"))
        src = default_corpus()[0] if data is None else read_text_source(data)
        ids = token_windows(tok, src, seq_len, windows, seed=0)
        targets = find_targets(m)
        fisher, stats = collect_curvature(m, targets, ids)
        what = f"{len(ids)} x {seq_len} tokens, LM loss"
    report = diagnose(m, targets, fisher, keep, stats)
    report["fisher_data"] = what
    if as_json:
        typer.echo(json.dumps(report))
        return
    bases = report["bases"]
    typer.echo(f"Diagnosis of {info_['name_or_path']} at keep {keep} ({what}; Fisher and both Grams from the same passes)")
    typer.echo("estimated loss increase of each base's truncation at the uniform rank, 1/2 tr(G dW A dW^T) in nats/token:")
    typer.echo(f"{'module':<48} {'cv_rows':>8} {'cv_cols':>8} {'svd/fwsvd':>10}" + "".join(f" {b:>10}" for b in bases))
    for name, sc in report["targets"].items():
        typer.echo(f"{name:<48} {sc['cv_rows']:>8.2f} {sc['cv_cols']:>8.2f} {sc['fisher_error_ratio']:>10.2f}"
                   + "".join(f" {sc['loss'][b]:>10.3g}" for b in bases))
    o = report["overall"]
    typer.echo(f"{'overall (parameter-weighted; losses summed)':<48} {o['cv_rows']:>8.2f} {o['cv_cols']:>8.2f} "
               f"{o['fisher_error_ratio']:>10.2f}" + "".join(f" {o['loss'][b]:>10.3g}" for b in bases))
    typer.echo(f"recommendation: {report['recommendation']}")
    typer.echo(f"svd vs fwsvd: {report['svd_drop']}")


def _is_encoder(model: Optional[str]) -> bool:
    """True for a model without a causal LM head (BERT-like encoders, sequence classifiers, masked LMs)."""
    from .models import config_is_encoder

    return config_is_encoder(model)


def _label2id(model) -> Optional[dict]:
    from .train.task import model_label2id

    return model_label2id(model)


@app.command()
def plot(
    checkpoint: Path = typer.Argument(..., help="A ranklm checkpoint directory."),
    output: Path = typer.Option(..., "--output", "-o", help="PNG file to write."),
) -> None:
    """Draw rank per layer (and fraction kept) of a checkpoint's rank map as a PNG, plus any training trajectories.

    Trajectories recorded by learning methods (RankDyna's rank per matrix over training, ...) are
    drawn next to it as ``<output stem>-<name>.png``.
    """
    from .io import read_metadata
    from .report import plot_rank_map
    from .report.trajectory import plot_trajectories

    meta = read_metadata(checkpoint)
    path = plot_rank_map(meta, output)
    typer.echo(f"wrote {path}")
    for extra in plot_trajectories(meta, output):
        typer.echo(f"wrote {extra}")


@app.command()
def finetune(
    ctx: typer.Context,
    task: str = typer.Option("rotten-tomatoes", "--task", help="rotten-tomatoes (packaged) or a CSV/JSONL file with text,label (optional group) columns."),
    model_arg: Optional[str] = model_argument("Encoder folder (any AutoModelForSequenceClassification)"),
    model: Optional[str] = model_option("Encoder folder (any AutoModelForSequenceClassification)", "packaged all-MiniLM-L6-v2"),
    keep: float = typer.Option(0.6, "--keep", help="Fraction of the targets' parameters to keep, in (0, 1]; 1 = dense fine-tuning."),
    remove: Optional[float] = typer.Option(None, "--remove", help="Fraction to remove (= 1 - keep)."),
    allocator: str = typer.Option("rankdyna", "--allocator", help="rankdyna (ranks move while fine-tuning), static (dense fine-tune, truncate, fine-tune), ars, softlm, or any allocator."),
    base: str = typer.Option("svd", "--base", help="Base decomposition: svd, fwsvd, tfwsvd, whiten, asvd (Fisher bases use the task loss)."),
    steps: int = typer.Option(200, "--steps", help="Total training steps (every method spends the same number)."),
    lr: float = typer.Option(1e-4, "--lr", help="Adam learning rate."),
    head_steps: int = typer.Option(50, "--head-steps", help="Steps training the new classification head alone (encoder frozen) before any method's --steps (LP-FT); 0 = off."),
    head_lr: float = typer.Option(1e-3, "--head-lr", help="Adam learning rate of the head warm-up."),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples per step (the global batch, split over processes)."),
    max_length: int = typer.Option(64, "--max-length", help="Tokens per example (longer ones are truncated; snippets are <= 53 words)."),
    calib_windows: int = typer.Option(64, "--calib-windows", help="Windows of train-split text for activation statistics (whiten, asvd)."),
    fisher_examples: int = typer.Option(64, "--fisher-examples", help="Train examples whose task-loss gradients make the Fisher statistics (fwsvd, tfwsvd)."),
    base_opt: list[str] = typer.Option([], "--base-opt", help="Base option KEY=VALUE; repeatable."),
    alloc_opt: list[str] = typer.Option([], "--alloc-opt", help="Allocator option KEY=VALUE (see `ranklm methods`); repeatable."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Save resumable training state here every --save-every steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run whose state is in --state-dir (same command otherwise)."),
    save_every: int = typer.Option(25, "--save-every", help="Training steps between state saves with --state-dir."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Checkpoint directory to write (atomically; main process only)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
    seed: int = typer.Option(0, "--seed", help="Seed for the head's initialisation, batches and anything random."),
    threads: Optional[int] = threads_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary object as the last line on stdout."),
) -> None:
    """Fine-tune an encoder on a classification task while compressing it (docs/design.md §5); runs data-parallel under torchrun."""
    from .config import resolve_keep
    from .io import check_output_dir, save
    from .models import load_classifier, require_tokenizer
    from .tasks import load_task
    from .train.loop import process_state
    from .train.task import TaskRunConfig, finetune_task

    model = _pick_model(model_arg, model)
    keep_given = _given(ctx, "keep", keep)
    ratio = resolve_keep(keep if keep_given is None and remove is None else keep_given, remove)
    if resume and state_dir is None:
        raise RanklmError("--resume needs --state-dir (the folder the interrupted run saved its state in)")
    _set_threads(threads)
    cfg = TaskRunConfig(keep=ratio, allocator=allocator, base=base, steps=steps, lr=lr, head_steps=head_steps, head_lr=head_lr,
                        batch_size=batch_size,
                        max_length=max_length, seed=seed, calib_windows=calib_windows, fisher_examples=fisher_examples,
                        save_every=save_every, base_options=parse_options(base_opt, "--base-opt"),
                        allocator_options=parse_options(alloc_opt, "--alloc-opt"))
    from .train.task import plan_steps
    from .config import CompressConfig

    if ratio < 1:  # unknown base/allocator/options: one error line before any long work
        CompressConfig(keep=ratio, recipe=None, base=base, allocator=allocator, base_options=cfg.base_options,
                       allocator_options=plan_steps(cfg)["allocator_options"]).validate_options(from_cli=True)
    if output is not None:
        check_output_dir(output, overwrite)
    data = load_task(task)
    state = process_state()
    if batch_size < state.num_processes:
        raise RanklmError(f"--batch-size {batch_size} is smaller than the {state.num_processes} processes")
    t0 = time.perf_counter()
    m, tok, info_ = load_classifier(model, data.label_names, seed=seed)
    if getattr(m, "ranklm", None) is not None:
        raise RanklmError(f"{model} is already a ranklm checkpoint: finetune starts from a dense encoder")
    tok = require_tokenizer(tok, str(model or "the default encoder"))
    _check_positions(m, {"--max-length": max_length})
    if state.is_main_process:
        _echo_err(f"loaded {info_['name_or_path']} ({sum(p.numel() for p in m.parameters()):,} params) in {time.perf_counter() - t0:.1f}s; "
                  f"task {data.name}: " + ", ".join(f"{k} {v}" for k, v in data.sizes.items()) + f"; {state.num_processes} process(es)")
    summary = finetune_task(m, tok, data, cfg, state_dir=state_dir, resume=resume, progress=state.is_main_process,
                            model_info=info_)
    if not state.is_main_process:
        return
    if output is not None:
        save(m, tok, output, overwrite=overwrite)
    summary["output"] = str(output) if output else None
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(f"method            {summary['method']} on {data.name} ({summary['world_size']} process(es))")
    typer.echo(f"keep (targets)    requested {summary['keep_requested']:.4f}, achieved {summary['keep_achieved']:.4f}"
               + (f" (learned {summary['keep_learned']:.4f})" if "keep_learned" in summary else ""))
    typer.echo(f"keep (whole model) {summary['keep_achieved_model']:.4f}")
    typer.echo(f"test              accuracy {summary['accuracy']:.4f}, macro-F1 {summary['macro_f1']:.4f} "
               f"({summary['test_examples']} examples); validation accuracy {summary['validation_accuracy']:.4f}")
    typer.echo(f"training          {summary['steps']} steps in {summary['train_seconds']:.1f}s")
    typer.echo(f"saved             {output}" if output else "saved             (no --output given: nothing written)")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A ranklm checkpoint directory."),
    dense: Path = typer.Option(..., "--dense", help="Write a plain Hugging Face folder here (factors multiplied back)."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Export a checkpoint as a dense Hugging Face model that loads without ranklm."""
    from .io import export_dense

    export_dense(checkpoint, dense, overwrite)
    typer.echo(f"wrote dense Hugging Face model to {dense}")


@app.command()
def bench(
    ctx: typer.Context,
    recipes: str = typer.Option("kfac-global,svd-llm,svd-llm-v2,svd", "--recipes", help="Comma-separated recipes or base+allocator pairs (e.g. svd,svd-llm,whiten+energy)."),
    keep: str = typer.Option("0.8,0.6", "--keep", help="Comma-separated keep ratios of the targets' parameters."),
    model_arg: Optional[str] = model_argument("HF model folder or hub id"),
    model: Optional[str] = model_option("HF model folder or hub id"),
    data: Optional[str] = typer.Option(None, "--data", help="Calibration text: a text file, folder, .jsonl or .csv.", show_default="packaged convention speeches"),
    eval_data: list[str] = typer.Option([], "--eval-data", help="Evaluation text(s); repeatable, the first is the main one.", show_default="held-out part of --data"),
    output: Path = typer.Option(..., "--output", "--out", "-o", help="Directory for results.csv/.md/.json and the PNG plots (written atomically)."),
    calib_windows: int = typer.Option(128, "--calib-windows", help="Calibration windows (shared by every cell)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration window."),
    eval_seq_len: int = typer.Option(512, "--eval-seq-len", help="Tokens per evaluation window."),
    sequential: Optional[bool] = typer.Option(None, "--sequential/--whole-model", help="Statistics mode of every cell, as in compress.", show_default="block by block for whiten/asvd"),
    propagate: str = typer.Option("compressed", "--propagate", help="With --sequential: 'compressed' (refit) or 'dense'."),
    eval_windows: int = typer.Option(40, "--eval-windows", help="Evaluation windows per evaluation text."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed for window selection and anything random."),
    fisher_windows: int = typer.Option(32, "--fisher-windows", help="Windows for Fisher statistics (fwsvd/tfwsvd)."),
    include: list[str] = typer.Option([], "--include", help="Glob (or re:REGEX) on module names to compress; repeatable."),
    exclude: list[str] = typer.Option([], "--exclude", help="Glob (or re:REGEX) on module names to leave dense; repeatable."),
    base_opt: list[str] = typer.Option([], "--base-opt", help="[BASE:]KEY=VALUE, e.g. tfwsvd:adam_steps=40; repeatable."),
    alloc_opt: list[str] = typer.Option([], "--alloc-opt", help="[ALLOCATOR:]KEY=VALUE, e.g. sensitivity:windows=1; repeatable."),
    gen_prompts: int = typer.Option(20, "--gen-prompts", help="Prompts for the generation-quality columns (0 = skip)."),
    gen_tokens: int = typer.Option(64, "--gen-tokens", help="Greedy new tokens per prompt."),
    gen_prompt_len: int = typer.Option(32, "--gen-prompt-len", help="Tokens per prompt."),
    latency: bool = typer.Option(False, "--latency", help="Measure each cell's forward speed-up vs dense (interleaved medians)."),
    latency_shapes: str = typer.Option("1x128,1x512,8x128,8x512", "--latency-shapes", help="With --latency: BATCHxSEQ list."),
    latency_reps: int = typer.Option(5, "--latency-reps", help="With --latency: timed repetitions per model and shape."),
    latency_warmup: int = typer.Option(1, "--latency-warmup", help="With --latency: warm-up passes per model and shape."),
    decode_tokens: str = typer.Option("128x128", "--decode-tokens", help="With --latency: decode column at batch 1 with a KV cache, PROMPTxNEW tokens (0 = skip)."),
    auto: bool = typer.Option(False, "--auto", help="Pick the method with the best held-out calibration perplexity (one --keep)."),
    save_best: Optional[Path] = typer.Option(None, "--save-best", help="With --auto: save the chosen model here as a ranklm checkpoint."),
    save_dir: Optional[Path] = typer.Option(None, "--save-dir", help="Save every cell's model as a ranklm checkpoint in DIR/<method>@<keep> (e.g. to run `ranklm evaluate --latency` on one)."),
    auto_windows: int = typer.Option(8, "--auto-windows", help="With --auto: held-out calibration windows."),
    rank_plot_keep: Optional[float] = typer.Option(None, "--rank-plot-keep", help="Keep ratio drawn in ranks.png.", show_default="the smallest"),
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype while compressing/evaluating every cell and in the saved checkpoint: auto (the model folder's own), float32, bfloat16, float16. Statistics and factorizations stay float32/float64."),
    threads: Optional[int] = threads_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output (and --save-best) if they exist."),
    as_json: bool = typer.Option(False, "--json", help="Print the result rows as JSON on stdout."),
) -> None:
    """Every method side by side: methods x keep ratios in one process, same data; table, plots, reproducing commands."""
    from .bench import (BenchOptions, command_line, parse_keeps, parse_methods, parse_scoped_options, results_markdown,
                        run_bench, write_outputs)
    from .calibration import read_text_source
    from .eval.latency import parse_decode_tokens, parse_shapes
    from .io import check_output_dir
    from .models import load_model, require_tokenizer

    model = _pick_model(model_arg, model)
    methods = parse_methods(recipes)
    keeps = parse_keeps(keep)
    for name, v in (("calib-windows", calib_windows), ("seq-len", seq_len), ("eval-seq-len", eval_seq_len), ("eval-windows", eval_windows),
                    ("batch-size", batch_size), ("fisher-windows", fisher_windows), ("latency-reps", latency_reps),
                    ("auto-windows", auto_windows)):
        if v < 1:
            raise RanklmError(f"--{name} must be a positive integer")
    if gen_prompts < 0 or gen_tokens < 1 or gen_prompt_len < 1:
        raise RanklmError("--gen-prompts must be >= 0, --gen-tokens and --gen-prompt-len positive")
    if auto and len(keeps) != 1:
        raise RanklmError(f"--auto picks the best method at one budget: give one --keep ratio (got {len(keeps)})")
    if save_best is not None and not auto:
        raise RanklmError("--save-best needs --auto")
    if rank_plot_keep is not None and rank_plot_keep not in keeps:
        raise RanklmError(f"--rank-plot-keep {rank_plot_keep} is not one of the --keep ratios {keeps}")
    shapes = parse_shapes(latency_shapes)
    decode = parse_decode_tokens(decode_tokens)
    check_output_dir(output, overwrite)
    if save_best is not None:
        check_output_dir(save_best, overwrite)
    threads_used = _set_threads(threads)
    calib_src, main_eval = _eval_sources(data, eval_data[0] if eval_data else None)
    evals = [("eval" if not eval_data else Path(eval_data[0]).stem if eval_data[0] != "default" else "default-eval", main_eval)]
    for e in eval_data[1:]:
        src = read_text_source(e)
        label = Path(e).stem
        if label in {lab for lab, _ in evals}:
            label = f"{label}{len(evals)}"
        evals.append((label, src))
    opts = BenchOptions(
        calib_windows=calib_windows, seq_len=seq_len, eval_seq_len=eval_seq_len, sequential=sequential, propagate=propagate,
        eval_windows=eval_windows, batch_size=batch_size, seed=seed,
        fisher_windows=fisher_windows, include=list(include), exclude=list(exclude),
        base_options=parse_scoped_options(base_opt, "--base-opt"), allocator_options=parse_scoped_options(alloc_opt, "--alloc-opt"),
        gen_prompts=gen_prompts, gen_prompt_len=gen_prompt_len, gen_new_tokens=gen_tokens, latency=latency,
        latency_shapes=shapes, latency_reps=latency_reps, latency_warmup=latency_warmup, decode=decode, auto=auto,
        auto_windows=auto_windows, save_best=str(save_best) if save_best else None,
        save_dir=str(save_dir) if save_dir else None, rank_plot_keep=rank_plot_keep,
    )
    t0 = time.perf_counter()
    m, tok, info_ = load_model(model, dtype=_dtype(dtype))
    if getattr(m, "ranklm", None) is not None:
        raise RanklmError(f"{model} is already a ranklm checkpoint: bench starts from a dense model")
    tok = require_tokenizer(tok, info_.get("path", str(model)))
    _check_positions(m, {"--seq-len": seq_len, "--eval-seq-len": eval_seq_len})
    _echo_err(f"loaded {info_['name_or_path']} ({sum(p.numel() for p in m.parameters()):,} params) in {time.perf_counter() - t0:.1f}s")
    command = command_line(ctx)
    if threads is None:
        command += f" --threads {threads_used}"
    result = run_bench(
        m, tok, methods, keeps, calib_src, evals, opts, model_info=info_,
        command_args={"model": model, "data": data, "eval_data": list(eval_data), "threads": threads_used,
                      "dtype": None if _dtype(dtype) == "auto" else info_["dtype"]},
        log=_echo_err,
    )
    write_outputs(result, output, command=command, overwrite=overwrite)
    failed = [r for r in result.rows if r.get("status") != "ok"]
    if as_json:
        typer.echo(json.dumps({"rows": [{k: v for k, v in r.items() if k != "traceback"} for r in result.rows],
                               "best": result.best, "output": str(output)}, default=str))
    else:
        typer.echo(results_markdown(result, command))
        typer.echo(f"wrote {output}/results.csv, results.md, results.json, ppl_vs_keep.png, ranks.png")
    if failed:
        first = failed[0]
        _echo_err(f"error: {len(failed)} of {len(result.rows)} bench cells failed (first: {first.get('method')} at keep "
                  f"{first.get('keep')}: {_one_line(first.get('error', ''))}); see {output}/results.md")
        raise typer.Exit(1)


@app.command()
def generate(
    model_arg: Optional[str] = model_argument("Checkpoint or HF model folder"),
    model: Optional[str] = model_option("Checkpoint or HF model folder"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue (with --chat: the user's message)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate (prompt + new tokens must fit the model's positions)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template as a user message and generate the assistant's answer."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature", help="With --sample: softmax temperature."),
    top_p: float = typer.Option(1.0, "--top-p", help="With --sample: nucleus probability mass."),
    seed: int = typer.Option(0, "--seed", help="With --sample: random seed."),
    dtype: str = dtype_option("Run the model in this dtype (a bfloat16 checkpoint stays bfloat16 with auto)"),
    device: str = device_option("generate"),
    threads: Optional[int] = threads_option(),
) -> None:
    """Continue a prompt with a model or checkpoint, streaming the text to stdout."""
    from .eval.generate import has_chat_template, stream_generate
    from .models import load_model, require_tokenizer

    model = _pick_model(model_arg, model)
    _set_threads(threads)
    if max_new_tokens < 1:
        raise RanklmError("--max-new-tokens must be a positive integer")
    m, tok, info_ = load_model(model, dtype=_dtype(dtype), device=_torch_device(device))
    tok = require_tokenizer(tok, str(model or "the default model"))
    if chat and not has_chat_template(tok):
        raise RanklmError(f"--chat: the tokenizer of {info_['name_or_path']} has no chat template")
    if not chat and has_chat_template(tok):
        _echo_err("note: this model has a chat template; --chat applies it to the prompt")
    from .architectures import max_positions

    stream_generate(m, tok, prompt, max_new_tokens, sample, temperature, top_p, seed, chat=chat,
                    max_positions=max_positions(m.config))


@app.command()
def methods() -> None:
    """Every base, allocator, trainer and recipe, with each option's type, default and help."""
    typer.echo(_list_methods())


def _axes(axes: Any) -> list[str]:
    """A recipe's axes as names: ``("whiten", "uniform")`` or ``{"base": ..., "allocator": ..., ...}``."""
    from collections.abc import Mapping

    values = axes.values() if isinstance(axes, Mapping) else axes if isinstance(axes, (tuple, list)) else [axes]
    return [str(a) for a in values if a and a != "none"]


def _list_methods() -> str:
    """Every base, allocator, trainer and recipe with its options, defaults and help."""
    from .config import DEFAULT_RECIPE, LAYERWISE_DEFAULT_RECIPE, RECIPES
    from .options import describe_options
    from .registry import table

    sections = []
    for kind, title in (("base", "Bases"), ("allocator", "Allocators"), ("trainer", "Trainers")):
        found = table(kind)
        if not found:
            continue
        flag = {"base": "--base-opt", "allocator": "--alloc-opt", "trainer": "--train-opt"}[kind]
        blocks = []
        for name, cls in sorted(found.items()):
            spec = getattr(cls, "OPTIONS", None)
            blocks.append(describe_options(kind, name, spec) if spec is not None
                          else f"{kind} {name}\n    (options not declared)")
        sections.append(f"{title} (options: {flag} KEY=VALUE)\n\n" + "\n\n".join(blocks))
    width = max(len(r) for r in RECIPES)
    recipes = [f"    {name:<{width}}  = {' + '.join(_axes(axes))}" for name, axes in sorted(RECIPES.items())]
    recipes.append(f"\n    default: {DEFAULT_RECIPE} for models with an LM head; {LAYERWISE_DEFAULT_RECIPE} for encoders "
                   "(no LM loss) and with --sequential")
    sections.append("Recipes (--recipe NAME; --base/--allocator override an axis)\n\n" + "\n".join(recipes))
    return "\n\n".join(sections)


def _click_exception_classes(name: str) -> tuple[type, ...]:
    """``name`` from typer's vendored click (typer >= 0.24), typer itself and click, where each exists."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "typer.exceptions", "typer", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors (ours and the command line parser's) become one line and exit code 2."""
    exit_classes = _click_exception_classes("Exit")
    abort_classes = _click_exception_classes("Abort")
    help_classes = _click_exception_classes("NoArgsIsHelpError")  # bare `ranklm`: the help text, not an error
    click_classes = _click_exception_classes("ClickException")

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    _quiet_libraries()
    try:
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except RanklmError as e:
        _echo_err(f"error: {_one_line(str(e))}")
        return 2
    except (KeyboardInterrupt, *abort_classes):
        _echo_err("interrupted: no output was written under the final name")
        return 130
    except BaseException as e:
        if exit_classes and isinstance(e, exit_classes):
            return int(getattr(e, "exit_code", 0) or 0)
        if help_classes and isinstance(e, help_classes):
            e.show()  # type: ignore[attr-defined]
            return int(getattr(e, "exit_code", 2))
        is_usage = (click_classes and isinstance(e, click_classes)) or (
            hasattr(e, "show") and hasattr(e, "exit_code") and hasattr(e, "format_message")
        )
        if not is_usage:
            raise
        # typer/click usage errors (bad value, unknown flag, missing argument, ...): one line, exit 2.
        _echo_err(f"error: {_one_line(e.format_message())}")  # type: ignore[attr-defined]
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
