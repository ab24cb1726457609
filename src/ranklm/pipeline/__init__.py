"""The compression pipeline, written once (docs/design.md §1 "One pipeline").

``run(model, tokenizer, plan, data)`` is the only place that sequences the stages. It reads a
resolved ``Plan`` (``make_plan(config, model)``: axes built, budget, calibration, targets), never
the raw config; the drivers above it (``ranklm.apps``: compress, bench, finetune; ``ranklm.compress``;
the scripts in ``benchmarks/``) build the plan from a ``CompressConfig``:

1. **prepare** — targets, input checks, calibration windows and their description (and a trainer's
   longer list of windows when it trains on more of the calibration text: ``heal``'s ``windows``);
2. **statistics + factorize** (pass 1) — every target's ordered components from its
   base. Whole-model statistics, or block by block with dense propagation (the same
   factorizations, memory ~ one block's statistics). Skipped when the allocator reads
   only shapes (``uniform``) and the refit pass factors anyway;
3. **allocate** — the rank map, by any allocator; learning allocators (ARS) train here
   on the shared loop and may hand back trained factors;
4. **refit** — block by block with *compressed* propagation: each block is factored
   again on the activations of the already-compressed blocks before it, at the
   allocated ranks (SVD-LLM's update; measured best way to build the factors), then
   installed. Without it: the base's ``refine`` at the allocated ranks (TFWSVD), then
   install. Trained factors from stage 3 are installed as they are (neither refit nor
   refine touches them);
5. **install** — ``LowRankLinear`` for every factored target;
   5b. **block refit** (``--block-refit``, off by default) — block by block, every factored target refit in
   closed form so its outputs on the compressed model's activations match the dense layer's
   (accumulated-error correction, ``block_refit.py``);
6. **train** — the trainer of the training axis (``--trainer finetune``), on the loop;
7. **record** — the ``CompressionState`` saved in ranklm.json (incl. the training records).

Which statistics mode runs is a driver choice (``CompressConfig.sequential``/``propagate``, resolved into the plan),
not a separate code path per caller: ``bench`` runs each cell through ``run`` with a
``FactorCache`` that shares pass-1 results between cells, so a bench cell is exactly
what ``compress`` does.

The stages live in one module each (plan, windows, factorize, install, record); ``run`` in sequencer.py
is the only place that orders them.
"""

from __future__ import annotations

from .plan import ACTIVATION_NEEDS, BudgetPlan, CalibrationPlan, Data, Plan, make_plan
from .windows import calibration_info, calibration_windows, trainer_windows, windows_sha256
from .factorize import FactorCache, decompose_targets, numerics_records, refine_factors, refit_sequential
from .install import adjusted_rank_map, allocate_ranks, check_finite_weights, install_factors, install_rank_map
from .record import (
    compression_state,
    knapsack_warning,
    learning_summary,
    numerics_warning,
    output_side_warning,
    run_warnings,
    sensitivity_warning,
)
from .run_state import open_run_state
from .sequencer import run

__all__ = [
    "ACTIVATION_NEEDS",
    "BudgetPlan",
    "CalibrationPlan",
    "Data",
    "FactorCache",
    "Plan",
    "adjusted_rank_map",
    "allocate_ranks",
    "calibration_info",
    "calibration_windows",
    "check_finite_weights",
    "compression_state",
    "decompose_targets",
    "install_factors",
    "install_rank_map",
    "knapsack_warning",
    "learning_summary",
    "make_plan",
    "numerics_records",
    "numerics_warning",
    "open_run_state",
    "output_side_warning",
    "refine_factors",
    "refit_sequential",
    "run",
    "run_warnings",
    "sensitivity_warning",
    "trainer_windows",
    "windows_sha256",
]
