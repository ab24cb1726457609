"""The serving route measured: a checkpoint and its dense twin exported to ONNX, timed in onnxruntime.

``onnx_serving_report`` exports both (``ranklm.checkpoint.onnx``: factored targets stay two
MatMuls; the dense twin has the factors multiplied back), checks each file against its torch model,
and times the two onnxruntime sessions on the same random ids, interleaved as ``measure_latency``
does for torch (``timed_point``), with the same thread count. Reported: file bytes of both graphs,
their ratio, the logit error of each export, and the speed-up per shape. No KV cache: every timed
call is a full forward (prefill).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.onnx import ONNX_FILE, cpu_float32, export_onnx_model, random_ids, require_onnx
from .latency import LatencyResult, dense_counterpart, timed_point
from .speedup_limits import flop_ratio_of_model


def _session(path: Path, threads: int) -> Any:
    ort = require_onnx()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_serving_report(compressed: nn.Module, shapes: list[tuple[int, int]], reps: int = 10, warmup: int = 2,
                        folder: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Export ``compressed`` and its dense twin to ONNX (in ``folder``, or a temp dir) and time both in onnxruntime."""
    with cpu_float32(compressed):
        flop_limit = flop_ratio_of_model(compressed)
        dense = dense_counterpart(compressed)
        threads = torch.get_num_threads()
        with tempfile.TemporaryDirectory(prefix="ranklm-onnx-") as tmp:
            root = Path(folder) if folder is not None else Path(tmp)
            exports = {name: export_onnx_model(m, None, root / name, overwrite=True)
                       for name, m in (("dense", dense), ("compressed", compressed))}
            del dense
            sessions = [_session(root / name / ONNX_FILE, threads) for name in ("dense", "compressed")]
            points = []
            for i, (batch, seq) in enumerate(shapes):
                ids = random_ids(compressed, batch, seq, seed + i).numpy()
                feed = {"input_ids": ids, "attention_mask": (ids * 0 + 1)}
                runs = [lambda s=s: s.run(None, feed) for s in sessions]
                points.append(timed_point(batch, seq, runs, reps, warmup))
    result = LatencyResult(points, flop_limit, threads, "cpu (onnxruntime)", extra={"runtime": "onnxruntime"})
    return {
        "onnx_bytes": {name: e["bytes"] for name, e in exports.items()},
        "onnx_bytes_ratio": exports["compressed"]["bytes"] / exports["dense"]["bytes"],
        "onnx_max_rel_err": {name: e["max_rel_err"] for name, e in exports.items()},
        "onnx_latency": result.to_dict(),
        "onnx_speedup": result.speedup,
        "onnxruntime_version": require_onnx().__version__,
        "table": result.table(),
    }


__all__ = ["onnx_serving_report"]
