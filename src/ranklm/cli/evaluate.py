"""``ranklm evaluate``: perplexity (or task accuracy), speed-up and lm-eval tasks of a model or checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import RanklmError
from .app import app
from .common import (
    check_positions,
    dtype_arg,
    echo_err,
    pick_model,
    set_threads,
    torch_device,
)
from .options import (
    device_option,
    dtype_option,
    model_argument,
    model_option,
    threads_option,
)


@app.command()
def evaluate(
    model_arg: Optional[str] = model_argument("Checkpoint or HF model folder"),
    model: Optional[str] = model_option("Checkpoint or HF model folder"),
    data: Optional[str] = typer.Option(None, "--data", help="Text file/folder/.jsonl/.csv, 'hamlet', 'default' or 'validation' (the default corpus's validation part, for tuning).", show_default="evaluation part of the packaged corpus"),
    windows: Optional[int] = typer.Option(None, "--windows", help="At most this many windows.", show_default="all"),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    latency: bool = typer.Option(False, "--latency", help="Checkpoint: median forward speed-up vs its dense counterpart (factors merged), next to the FLOP-ratio limit."),
    latency_shapes: str = typer.Option("1x128,1x512,8x128,8x512", "--latency-shapes", help="With --latency: BATCHxSEQ list."),
    latency_reps: int = typer.Option(10, "--latency-reps", help="With --latency: timed repetitions per model and shape (interleaved)."),
    latency_warmup: int = typer.Option(2, "--latency-warmup", help="With --latency: untimed warm-up passes per model and shape."),
    decode_tokens: str = typer.Option("128x128", "--decode-tokens", help="With --latency: decode speed at batch 1 with a KV cache, PROMPTxNEW tokens (0 = skip)."),
    onnx: bool = typer.Option(False, "--onnx", help="With --latency: export the checkpoint and its dense twin to ONNX and time both in onnxruntime on CPU (file sizes, logit check) instead of torch; no decode timing (needs ranklm[onnx])."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="With --latency on a GPU: time forwards and decode steps replayed from CUDA graphs (static KV cache), free of launch and Python overhead."),
    dtype: str = dtype_option("Run the model in this dtype"),
    device: str = device_option("evaluate (perplexity and --latency)"),
    threads: Optional[int] = threads_option(),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="Comma-separated lm-evaluation-harness tasks (needs pip install 'ranklm[eval]')."),
    lm_eval_include: Optional[Path] = typer.Option(None, "--lm-eval-include", help="With --lm-eval: folder of custom task YAMLs."),
    lm_eval_limit: Optional[float] = typer.Option(None, "--lm-eval-limit", help="With --lm-eval: at most this many documents per task."),
    task: Optional[str] = typer.Option(None, "--task", help="Classifiers: accuracy and macro-F1 on the test split of a task (rotten-tomatoes, convention-party or a text,label CSV/JSONL file) instead of perplexity."),
    max_length: int = typer.Option(64, "--max-length", help="With --task: tokens per example (longer ones are truncated)."),
) -> None:
    """Token perplexity of a model or checkpoint (docs/design.md §2); optionally speed-up and lm-eval tasks.

    With ``--task``: accuracy and macro-F1 of a sequence classifier (a ``ranklm finetune`` checkpoint)."""
    model = pick_model(model_arg, model)
    threads_used = set_threads(threads)
    if task is not None:
        evaluate_task_cmd(model, task, max_length, batch_size, as_json)
        return
    from ..calibration import default_corpus, read_text_source, token_windows
    from ..eval import perplexity
    from ..models import load_model, require_tokenizer

    if windows is not None and windows < 1:
        raise RanklmError("--windows must be a positive integer")
    src = default_corpus()[1] if data is None or data == "default" else read_text_source(data)
    shapes = None
    if latency:
        from ..eval.latency import parse_decode_tokens, parse_shapes

        shapes = parse_shapes(latency_shapes)
        decode = parse_decode_tokens(decode_tokens)
        if latency_reps < 1 or latency_warmup < 0:
            raise RanklmError("--latency-reps must be >= 1 and --latency-warmup >= 0")
    if onnx and (not latency or cuda_graphs):
        raise RanklmError("--onnx needs --latency (and times onnxruntime on CPU: not with --cuda-graphs)")
    if onnx:
        from ..checkpoint.onnx import require_onnx

        require_onnx()
    if cuda_graphs and (not latency or torch_device(device).type != "cuda"):
        raise RanklmError("--cuda-graphs needs --latency and --device cuda")
    if lm_eval is not None:
        from ..eval.lm_eval_bridge import _require_lm_eval

        _require_lm_eval()
    m, tok, info = load_model(model, dtype=dtype_arg(dtype), device=torch_device(device))
    tok = require_tokenizer(tok, str(model or "the default model"))
    check_positions(m, {"--seq-len": seq_len})
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
        from ..quantize.sizes import bytes_summary

        out.update(method=state.method, keep_achieved=state.keep_achieved, keep_achieved_model=state.keep_achieved_model,
                   **bytes_summary(m))
    lat = None
    onnx_table = None
    if shapes is not None:
        from ..modeling_ranklm import QuantizedLinear
        from ..layers import LowRankLinear

        if not any(isinstance(x, (LowRankLinear, QuantizedLinear)) for x in m.modules()):
            raise RanklmError(f"--latency compares a ranklm checkpoint with its dense counterpart; {info['name_or_path']} is not compressed")
    if shapes is not None and onnx:
        from ..eval.onnx_latency import onnx_serving_report

        report = onnx_serving_report(m, shapes, latency_reps, latency_warmup)
        out.update(onnx={k: v for k, v in report.items() if k != "table"}, speedup=report["onnx_speedup"])
        onnx_table = report["table"]
    elif shapes is not None:
        from ..eval.latency import dense_counterpart, measure_decode, measure_latency, tensor_core_note

        note = tensor_core_note(m, next(m.parameters()).device, next(m.parameters()).dtype)
        if note:
            echo_err(note)
        dense = dense_counterpart(m)
        lat = measure_latency(dense, m, shapes, latency_reps, latency_warmup, cuda_graphs=cuda_graphs)
        if decode is not None:
            lat.decode = measure_decode(dense, m, *decode, reps=latency_reps, warmup=latency_warmup, cuda_graphs=cuda_graphs)
            out.update(decode_speedup=lat.decode.speedup, decode_limit=lat.decode.limit)
        out.update(speedup=lat.speedup, flop_ratio_limit=lat.flop_ratio_limit, latency=lat.to_dict())
    if lm_eval is not None:
        from ..eval.lm_eval_bridge import lm_eval_tasks

        limit = None if lm_eval_limit is None else (int(lm_eval_limit) if lm_eval_limit >= 1 else lm_eval_limit)
        out["lm_eval"] = lm_eval_tasks(m, tok, lm_eval.split(","), include_path=lm_eval_include, limit=limit,
                                       batch_size=batch_size)
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"{info['name_or_path']}: {res}  params {out['params']:,}  data: {src.description}")
        if "target_bytes" in out:
            typer.echo(f"bytes: targets {out['target_bytes']:,} of {out['target_bytes_dense']:,} dense "
                       f"({out['target_bytes_ratio']:.4f}, {out['bits_per_target_weight']:.2f} bits per weight), "
                       f"model {out['model_bytes']:,}; keep (params) targets {out['keep_achieved']:.4f}, "
                       f"model {out['keep_achieved_model']:.4f}")
        if onnx_table is not None:
            o = out["onnx"]
            typer.echo(f"ONNX (onnxruntime {o['onnxruntime_version']}): {o['onnx_bytes']['compressed']:,} bytes vs dense "
                       f"{o['onnx_bytes']['dense']:,} ({o['onnx_bytes_ratio']:.3f}); max rel. logit error "
                       f"{o['onnx_max_rel_err']['compressed']:.1e}")
            typer.echo(onnx_table)
        if lat is not None:
            typer.echo(lat.table())
            h = lat.headline
            typer.echo(f"speed-up {h.speedup:.2f}x (batch {h.batch}, seq {h.seq_len}) vs FLOP-ratio limit {lat.flop_ratio_limit:.2f}x")
        for task, metrics in out.get("lm_eval", {}).items():
            typer.echo(f"lm-eval {task}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


def evaluate_task_cmd(model: Optional[str], task_spec: str, max_length: int, batch_size: int, as_json: bool) -> None:
    from ..models import load_classifier, require_tokenizer
    from ..tasks import load_task
    from ..train.task import evaluate_task

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
