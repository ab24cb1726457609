"""Bridge to EleutherAI's lm-evaluation-harness (optional extra ``ranklm[eval]``, docs/design.md §7).

``lm_eval_tasks(model, tokenizer, ["hellaswag", ...])`` runs
``lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok), tasks=...)``
on an in-memory (compressed) model, so LowRankLinear layers are evaluated as they
are, without a dense export. Hub tasks need internet (their data sets are
downloaded by ``datasets``); ``write_local_task`` builds a custom task from local
text (a ``loglikelihood_rolling`` perplexity task over a JSON-lines file, as
lm-eval's wikitext task does) that runs offline with ``HF_DATASETS_OFFLINE=1``.

Install: ``pip install 'lm-eval>=0.4'`` (about 30 s here; it pulls datasets,
evaluate, scikit-learn, sacrebleu, ...).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import RanklmError

INSTALL_HINT = "pip install 'ranklm[eval]'  (or: pip install 'lm-eval>=0.4')"


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise RanklmError(f"--lm-eval needs the lm-evaluation-harness, which is not installed ({e}); install it with {INSTALL_HINT}") from None
    return lm_eval


def write_local_task(texts: list[str], folder: str | os.PathLike, name: str = "ranklm_local_ppl") -> Path:
    """Write ``folder/{name}.jsonl`` (one ``{"text": ...}`` per document) and ``folder/{name}.yaml``,
    an lm-eval ``loglikelihood_rolling`` task (word/byte perplexity, bits per byte) over it.

    Pass ``folder`` as ``include_path`` and ``name`` as a task. Returns ``folder``."""
    if not texts or not any(t.strip() for t in texts):
        raise RanklmError("a local lm-eval task needs at least one non-empty document")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for t in texts:
            if t.strip():
                f.write(json.dumps({"text": t}) + "\n")
    yaml = f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data.resolve()))}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""
    (out / f"{name}.yaml").write_text(yaml)
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)


def lm_eval_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    device: str | None = None,
) -> dict[str, dict[str, Any]]:
    """``{task: {metric: value}}`` from ``lm_eval.simple_evaluate`` on ``model`` (kept in memory)."""
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise RanklmError("--lm-eval needs at least one task name (comma-separated)")
    if tokenizer is None:
        raise RanklmError("--lm-eval needs the model's tokenizer")
    if device is None:
        import torch

        device = str(next(model.parameters()).device) if any(True for _ in model.parameters()) else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    known = set(getattr(manager, "all_tasks", []) or [])
    unknown = [t for t in tasks if known and t not in known]
    if unknown:
        raise RanklmError(
            f"unknown lm-eval task(s) {', '.join(unknown)} (custom tasks: pass their folder with --lm-eval-include)"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    res = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        log_samples=False, bootstrap_iters=0,
    )
    if res is None:  # non-zero ranks in distributed runs
        return {}
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in res.get("results", {}).items():
        out[task] = {k.split(",")[0]: _clean(v) for k, v in metrics.items() if k != "alias" and "stderr" not in k}
    return out
