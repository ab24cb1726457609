"""ONNX export that keeps the savings: every factored target stays two MatMuls (``x B^T A^T``).

Why ONNX: onnxruntime is the best-kept CPU runtime that takes an arbitrary graph (the factored
layers need no kernel of their own, unlike llama.cpp or vLLM, which rebuild models from their own
layer code), it runs without torch, and it is what ``optimum`` serves transformers models with.
The graph is captured by torch's own exporter (``torch.onnx.export(dynamo=True)``, i.e.
``torch.export`` + onnxscript) with batch and sequence length dynamic; the model runs without a
KV cache (one forward: input ids + attention mask -> logits, or the last hidden state for a bare
encoder). After writing, the file is run once in onnxruntime on fresh token ids and its outputs
are checked against the torch model's, so an export that does not reproduce the model is refused
rather than shipped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures import max_positions
from ..atomic import atomic_dir, check_output_dir
from ..errors import RanklmError

ONNX_FILE = "model.onnx"
INSTALL_HINT = "pip install 'ranklm[onnx]'"
CHECK_RTOL = 1e-4  # max |onnx - torch| / max |torch| accepted after export (float32 kernels differ in order)


def require_onnx() -> Any:
    """onnxruntime (and the exporter's onnx/onnxscript), or one error line naming the extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise RanklmError(f"ONNX export needs onnx, onnxscript and onnxruntime, which are not installed ({e}); "
                          f"install them with {INSTALL_HINT}") from None
    return onnxruntime


class _Forward(nn.Module):
    """(input_ids, attention_mask) -> logits (or last hidden state): the one tensor a serving graph returns."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.kw = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self.kw)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def random_ids(model: nn.Module, batch: int, seq: int, seed: int) -> torch.Tensor:
    """``batch x seq`` token ids from the model's vocabulary, reproducible by seed."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 100)
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _within_positions(model: nn.Module, seq: int) -> int:
    """``seq``, or fewer where the model has fewer positions (a tiny test model)."""
    config = getattr(model, "config", None)
    limit = max_positions(config) if config is not None else None
    return min(seq, limit or seq)


@contextlib.contextmanager
def cpu_float32(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` moved to the CPU in float32 (what ONNX export and onnxruntime run) for the block,
    then put back on its device and dtype, so a caller's model is left as it was."""
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    moved = device.type != "cpu" or dtype != torch.float32
    if moved:
        model.to("cpu", torch.float32)
    try:
        yield model
    finally:
        if moved:
            model.to(device, dtype)


def onnx_files_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the graph and its weights (``model.onnx`` plus any external data file)."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.name.startswith(ONNX_FILE))


def write_onnx(model: nn.Module, folder: Path, opset: int | None = None) -> Path:
    """Export ``model`` (float32 on CPU, eval mode) to ``folder/model.onnx``; returns the file."""
    require_onnx()
    model = model.eval()
    seq = _within_positions(model, 16)
    ids = random_ids(model, 2, seq, seed=0)
    mask = torch.ones_like(ids)
    mask[0, : seq // 4] = 0  # trace the padded path: with an all-ones mask transformers may drop the mask from the graph
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2)
    dims = {0: batch, 1: length}
    out = folder / ONNX_FILE
    kwargs: dict[str, Any] = {} if opset is None else {"opset_version": opset}
    try:
        with torch.no_grad():
            torch.onnx.export(_Forward(model).eval(), (ids, mask), str(out), dynamo=True, input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], dynamic_shapes=(dims, dims), verbose=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; name the cause in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RanklmError(f"ONNX export of {type(model).__name__} failed: {msg}") from None
    return out


def check_onnx(model: nn.Module, path: Path, batch: int = 3, seq: int = 12, seed: int = 1) -> float:
    """Run ``path`` in onnxruntime on fresh ids of another shape than the export's (one row left-padded);
    the relative max error against the torch model over the real (unpadded) positions. RanklmError
    if it exceeds ``CHECK_RTOL``."""
    ort = require_onnx()
    seq = _within_positions(model, seq)
    ids = random_ids(model, batch, seq, seed)
    mask = torch.ones_like(ids)
    mask[0, : seq // 3] = 0  # a left-padded row: the mask must reach the graph
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
    with torch.no_grad():
        ref = _Forward(model.eval())(ids, mask).float()
    keep = mask.bool()  # padded positions attend to nothing: their outputs are undefined in both runtimes
    err = float((got - ref)[keep].abs().max() / ref[keep].abs().max().clamp_min(1e-12))
    if not err <= CHECK_RTOL:
        raise RanklmError(f"the ONNX export of {path.parent} does not reproduce the model: max relative error "
                          f"{err:.2e} > {CHECK_RTOL:.0e}")
    return err


def refuse_quantized(model: nn.Module) -> None:
    """One error line for a model with quantized layers (``QuantizedLinear``, ``--quantize``): torch's exporter
    does not capture their dequantizing forward (its cached unpacked codes), and a graph that dequantized at
    export time would store float weights, losing the point of the quantized file."""
    quantized = [n for n, m in model.named_modules() if hasattr(m, "qweight") and hasattr(m, "dequantized")]
    if quantized:
        raise RanklmError(f"ONNX export of quantized checkpoints is not supported yet ({len(quantized)} quantized "
                          f"layers, e.g. {quantized[0]}): export a checkpoint compressed without --quantize, or the dense "
                          "twin (ranklm.checkpoint.onnx.export_onnx(..., dense=True))")


def export_onnx_model(model: nn.Module, tokenizer: Any, out: str | os.PathLike, overwrite: bool = False,
                      opset: int | None = None) -> dict[str, Any]:
    """Write ``out/`` atomically: ``model.onnx`` (+ external weights if large), ``config.json`` and the
    tokenizer; checked in onnxruntime before the folder appears. Returns ``{"path", "bytes", "max_rel_err"}``.
    A model with quantized layers is refused (``refuse_quantized``)."""
    check_output_dir(out, overwrite)
    refuse_quantized(model)
    require_onnx()
    with cpu_float32(model), atomic_dir(out, overwrite) as tmp:
        path = write_onnx(model, tmp, opset)
        err = check_onnx(model, path)
        config = getattr(model, "config", None)
        if config is not None:
            config.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        size = onnx_files_bytes(tmp)
    return {"path": str(out), "bytes": size, "max_rel_err": err}


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                dense: bool = False) -> dict[str, Any]:
    """Path to path: a ranklm checkpoint as an ONNX folder (factored, or with ``dense`` its dense twin)."""
    from ..hf import merge_and_unload
    from .reading import load

    check_output_dir(out, overwrite)
    require_onnx()
    model, tokenizer = load(checkpoint, dtype=torch.float32)
    if dense:
        merge_and_unload(model)
    return export_onnx_model(model, tokenizer, out, overwrite)


__all__ = ["CHECK_RTOL", "INSTALL_HINT", "ONNX_FILE", "check_onnx", "cpu_float32", "export_onnx", "export_onnx_model",
           "onnx_files_bytes", "random_ids", "refuse_quantized", "require_onnx", "write_onnx"]
