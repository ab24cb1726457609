"""CompressConfig and the named recipes.

A method is ``base x allocator (x training)``; a recipe is just a name for a
common pair. ``--base``/``--allocator`` given explicitly override the recipe.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import RanklmError

# recipe name -> (base, allocator)
RECIPES: dict[str, tuple[str, str]] = {
    "svd": ("svd", "uniform"),
    "svd-llm": ("whiten", "uniform"),
    "svd-llm-v2": ("whiten", "loss"),
    "fwsvd": ("fwsvd", "uniform"),
    "tfwsvd": ("tfwsvd", "uniform"),
    "asvd": ("asvd", "sensitivity"),
    "svd-energy": ("svd", "energy"),
    "svd-llm-energy": ("whiten", "energy"),
    "kfac-global": ("kfac", "global"),  # GFWSVD / KFAC-SVD with an exact global knapsack over estimated loss
}

# The default method: curvature on both sides of every target plus the exact global knapsack (zero training).
# Measured on the packaged SmolLM2 (one `ranklm bench`, 32 x 512 calibration, 16 x 512 evaluation windows;
# benchmarks/README.md §1b): perplexity 28.78 / 55.05 / 135.27 at keep 0.8 / 0.6 / 0.4 against svd-llm's
# 55.12 / 116.66 / 283.84 (dense 23.19), and 1.94x dense on Hamlet at keep 0.8 against svd-llm's 7.6x.
DEFAULT_RECIPE = "kfac-global"
# It needs end-to-end gradients of an LM loss over the whole model, so where that does not fit the run
# (a model without an LM head, or --sequential: block-by-block memory) the default is the layer-by-layer
# whitened SVD instead.
LAYERWISE_DEFAULT_RECIPE = "svd-llm"
AUTO = "default"  # CompressConfig(recipe="default"): DEFAULT_RECIPE, or LAYERWISE_DEFAULT_RECIPE where it cannot run
DEFAULT_KEEP = 0.8
DEFAULT_CALIB_WINDOWS = 128
DEFAULT_SEQ_LEN = 512


def parse_option_value(text: str) -> Any:
    """A ``KEY=VALUE`` option's value: JSON when it is JSON (numbers, true/false, lists), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def resolve_keep(keep: float | None, remove: float | None) -> float:
    """Turn ``--keep``/``--remove`` into one keep ratio in (0, 1]."""
    if keep is not None and remove is not None:
        raise RanklmError("give either --keep or --remove, not both")
    if keep is None and remove is None:
        return DEFAULT_KEEP
    if remove is not None:
        if not (math.isfinite(remove) and 0.0 <= remove < 1.0):
            raise RanklmError(f"bad ratio --remove {remove}: it must lie in [0, 1) (--remove 0.4 = --keep 0.6)")
        return 1.0 - float(remove)
    assert keep is not None
    if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise RanklmError(
            f"bad ratio --keep {keep}: it must lie in (0, 1] "
            "(--keep 0.6 keeps 60% of the parameters of the targeted layers)"
        )
    return float(keep)


BLOCK_REFIT_MODES = ("off", "full", "output", "drift")  # --block-refit (pipeline/block_refit.py)


def check_block_refit(mode: str) -> str:
    """``mode`` if it is a ``--block-refit`` mode, else one error line naming the valid ones."""
    if mode not in BLOCK_REFIT_MODES:
        raise RanklmError(f"unknown --block-refit mode {mode!r}; valid: {', '.join(BLOCK_REFIT_MODES)}")
    return mode


def run_field(default: Any, flag: str, help: str, *, show_default: str | None = None, positive: bool = False,
              factory: Any = None) -> Any:
    """A ``CompressConfig`` field that is also a command-line option: ``compress`` and ``bench`` build their
    option from it (``cli/run_options.py``), and bench writes it back into each cell's command, so adding a
    run option is this one field. ``positive``: refused below 1 (one error line naming the flag)."""
    meta = {"flag": flag, "help": help, "show_default": show_default, "positive": positive}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def field_default(f: Any) -> Any:
    """A dataclass field's default value (its factory called)."""
    from dataclasses import MISSING

    return f.default_factory() if f.default_factory is not MISSING else f.default


def run_fields(config_cls: type | None = None) -> list[Any]:
    """The fields of ``config_cls`` (default ``CompressConfig``) declared with ``run_field``: the run options."""
    return [f for f in fields(config_cls or CompressConfig) if "flag" in f.metadata]


@dataclass
class CompressConfig:
    """Everything that decides a compression run (recorded in ranklm.json).

    Method selection (keep, recipe, axes and their options) is spelled by each command; every other field
    is a ``run_field``, one declaration for the config, its validation, the CLI option and bench's commands.
    """

    keep: float = DEFAULT_KEEP
    recipe: str | None = AUTO
    base: str | None = None
    allocator: str | None = None
    include: list[str] = run_field(None, "--include", "Glob (or re:REGEX) on module names to compress; repeatable.",
                                   factory=list)
    exclude: list[str] = run_field(None, "--exclude", "Glob (or re:REGEX) on module names to leave dense; repeatable.",
                                   factory=list)
    # None = the allocator's ``default_calib_windows`` if it declares one (learning allocators: 32, so a
    # default run fits this project's CPU budget; docs/design.md §5), else DEFAULT_CALIB_WINDOWS.
    calib_windows: int | None = run_field(
        None, "--calib-windows", "Calibration windows.", positive=True,
        show_default=f"{DEFAULT_CALIB_WINDOWS}; 32 for the learning allocators ars and softlm, whose training dominates the run")
    seq_len: int = run_field(DEFAULT_SEQ_LEN, "--seq-len", "Tokens per calibration window.", positive=True)
    batch_size: int = run_field(4, "--batch-size", "Windows per forward pass (and per training step unless a method's "
                                "batch_size option says otherwise).", positive=True)
    seed: int = run_field(0, "--seed", "Seed for window selection and anything random.")
    min_rank: int = run_field(1, "--min-rank", "Smallest rank a factored target may get from the allocator.", positive=True)
    # Factored ranks rounded to multiples of this after allocation (GEMM-friendly shapes; budget rules kept); 1 = off.
    round_to: int = run_field(1, "--round-to", "Round factored ranks to multiples of this (e.g. 8, 16, 32: GEMM-friendly "
                              "shapes) after allocation, keep ratio still within 0.5 % below --keep; 1 = off.", positive=True)
    # Latency-aware rule: no target stays factored above this fraction of its dense FLOPs (it goes dense or
    # below it; budget.latency_dense_rule); 1.0 = off.
    max_flop_ratio: float = run_field(
        1.0, "--max-flop-ratio", "Latency-aware rule: a target whose factored form would keep more than this fraction "
        "of its dense FLOPs (rank*(m+n) > ratio*m*n; two thin GEMMs near break-even are slower than one dense GEMM) is "
        "kept dense when the budget pays for it, else cut below the ratio; freed parameters go to the other targets; "
        "keep never rises above --keep; 1 = off, e.g. 0.6.")
    fisher_windows: int = run_field(32, "--fisher-windows", "Calibration windows used for gradient statistics "
                                    "(fwsvd/tfwsvd Fisher, kfac output gradients).", positive=True)
    # Layer-by-layer calibration (docs/design.md §6). None = automatic: on for activation-statistics bases
    # (whiten, asvd) with the uniform allocator, where per-block allocation equals the global one and
    # propagating compressed outputs measured better (benchmarks/sequential.py at keep 0.6).
    sequential: bool | None = run_field(
        None, "--sequential/--whole-model", "Block-by-block calibration (memory ~ model + one block's statistics) "
        "and refit of the allocated ranks on compressed activations.", show_default="on for whiten/asvd")
    # How a gradient base's statistics and factorizations are held (pipeline/memory.py, pipeline/bounded.py):
    # "bounded" one block at a time (factors spilled to disk; the same result), "whole" every target at once,
    # "auto" bounded wherever it applies (kfac-global), else whole; the preflight refuses a mode that cannot fit.
    memory_mode: str = run_field(
        "auto", "--memory-mode", "kfac statistics and factorizations: 'bounded' one block at a time (the same result; "
        "factors spilled to a temporary folder, RANKLM_SPILL_DIR), 'whole' every target at once, 'auto' bounded "
        "where it applies. A memory preflight refuses a mode whose estimate does not fit (RANKLM_MEMORY_LIMIT caps it).")
    # Running sums of the statistics (calibration/accumulate.py): float64 in CPU memory, or float32 where the
    # activations are (no device-to-host copy per batch); "auto" = float32 on a GPU, float64 on the CPU.
    stats_dtype: str = run_field(
        "auto", "--stats-dtype", "Running sums of calibration statistics: 'float64' (in CPU memory), 'float32' (kept "
        "on the model's device), 'auto' (float32 on a GPU, float64 on the CPU).")
    propagate: str = run_field("compressed", "--propagate", "With --sequential: later blocks see the 'compressed' "
                               "(refit) or 'dense' outputs.")
    # Block-level refit after installation (pipeline/block_refit.py): closed-form accumulated-error correction of
    # every factored target, block by block, against the dense model's outputs on compressed inputs.
    block_refit: str = run_field(
        "off", "--block-refit", "After installation, refit every factored target block by block so its outputs on "
        "the compressed model's activations match the dense layer's (closed form): 'full' (best rank-k fit), "
        "'output' (keep the base's output subspace, refit B), 'drift' (undo the input drift only), 'off'.")
    block_refit_damping: float = run_field(
        0.01, "--block-refit-damping", "With --block-refit: damping of the compressed inputs' Gram, relative to its "
        "mean diagonal.")
    # Weight-only quantization after compression (ranklm/quantize, docs/design.md §11): one width for every target,
    # or several for the joint rank x bits allocator under --budget-bytes.
    quantize: str | None = run_field(
        None, "--quantize", "Weight-only quantization of every target after compression, both factors or the dense "
        "weight: int8, int4, int3, int2 (int5-7 too); a comma list (int2,int3,int4,int8) lets the joint allocator "
        "choose rank and width per target under --budget-bytes. --keep 1 --quantize int4 is plain quantization.",
        show_default="off")
    quant_group_size: int = run_field(64, "--quant-group-size", "Weights per scale and zero point along each "
                                      "matrix's input (must divide the targets' input sizes; e.g. 32, 64, 128).",
                                      positive=True)
    budget_bytes: str | None = run_field(
        None, "--budget-bytes", "Budget in bytes instead of --keep: a fraction of the targets' dense bytes in the "
        "model's dtype (0.25), bits per target weight (3bpw), or a size (150MB, 1.2GiB). With --quantize the joint "
        "allocator (kfac base) chooses rank and width per target; without it, float factors at that fraction.",
        show_default="off (--keep)")
    base_options: dict[str, Any] = field(default_factory=dict)
    allocator_options: dict[str, Any] = field(default_factory=dict)
    # The training axis after installation: "none" or a registered trainer.
    trainer: str = run_field("none", "--trainer", "Training after installation: none or a trainer of `ranklm methods` "
                             "(finetune).")
    trainer_options: dict[str, Any] = field(default_factory=dict)
    # True when the recipe came from the default (recipe="default"), so ``for_model`` may switch it to the
    # layer-by-layer default for a model the default cannot run on; an explicitly named recipe never changes.
    default_recipe: bool = False

    def __post_init__(self) -> None:
        self.keep = resolve_keep(self.keep, None)
        from .registry import table

        BASES, ALLOCATORS, TRAINERS = table("base"), table("allocator"), table("trainer")

        if self.recipe == AUTO:
            self.default_recipe = True
            # an explicit axis keeps the old meaning (the missing one from svd-llm); --sequential needs it too
            layerwise = self.base is not None or self.allocator is not None or bool(self.sequential)
            self.recipe = LAYERWISE_DEFAULT_RECIPE if layerwise else DEFAULT_RECIPE

        if self.recipe is not None and self.recipe not in RECIPES:
            raise RanklmError(
                f"unknown recipe {self.recipe!r}; valid recipes: {', '.join(sorted(RECIPES))}"
            )
        rb, ra = RECIPES[self.recipe] if self.recipe else ("svd", "uniform")
        self.base = self.base or rb
        self.allocator = self.allocator or ra
        if self.base not in BASES:
            raise RanklmError(f"unknown base {self.base!r}; valid bases: {', '.join(sorted(BASES))}")
        if self.allocator not in ALLOCATORS:
            raise RanklmError(
                f"unknown allocator {self.allocator!r}; valid allocators: {', '.join(sorted(ALLOCATORS))}"
            )
        if getattr(ALLOCATORS[self.allocator], "needs_loss_estimates", False) and getattr(BASES[self.base], "loss_scale", None) is None:
            comparable = sorted(n for n, cls in BASES.items() if getattr(cls, "loss_scale", None) is not None)
            raise RanklmError(
                f"the {self.allocator} allocator needs a base whose spectra estimate loss comparably across targets "
                f"({', '.join(comparable)}); {self.base}'s do not"
            )
        self.trainer = self.trainer or "none"
        if self.trainer != "none" and self.trainer not in TRAINERS:
            raise RanklmError(f"unknown trainer {self.trainer!r}; valid trainers: none, {', '.join(sorted(TRAINERS))}")
        if self.trainer == "none" and self.trainer_options:
            raise RanklmError("training options (--train-opt) given but no trainer (--trainer finetune)")
        if self.calib_windows is None:
            self.calib_windows = int(getattr(ALLOCATORS[self.allocator], "default_calib_windows", DEFAULT_CALIB_WINDOWS))
        if self.recipe and (self.base, self.allocator) != RECIPES[self.recipe]:
            self.recipe = None  # explicit axes override the recipe's name
        if self.stats_dtype not in ("auto", "float32", "float64"):
            raise RanklmError(f"unknown stats dtype {self.stats_dtype!r}; valid: auto, float32, float64")
        if self.memory_mode not in ("auto", "bounded", "whole"):
            raise RanklmError(f"unknown memory mode {self.memory_mode!r}; valid: auto, bounded, whole")
        from .quantize.spec import parse_budget_bytes, parse_quantize

        spec = parse_quantize(self.quantize, int(self.quant_group_size))  # one error line when bad
        parse_budget_bytes(self.budget_bytes, 1, 1)
        if spec is not None and spec.joint and self.budget_bytes is None:
            raise RanklmError(f"--quantize {self.quantize} lists several widths: the joint allocator chooses among "
                              "them under a byte budget; give --budget-bytes (or one width)")
        check_block_refit(self.block_refit)
        if not float(self.block_refit_damping) >= 0.0:
            raise RanklmError(f"--block-refit-damping must be >= 0, got {self.block_refit_damping}")
        if self.propagate not in ("compressed", "dense"):
            raise RanklmError(f"unknown propagate mode {self.propagate!r}; valid: compressed, dense")
        for f in run_fields(type(self)):
            if f.metadata["positive"] and int(getattr(self, f.name)) < 1:
                raise RanklmError(f"{f.metadata['flag']} must be a positive integer")
        if not 0.0 < float(self.max_flop_ratio) <= 1.0:
            raise RanklmError(f"max-flop-ratio must lie in (0, 1], got {self.max_flop_ratio}")
        from .targets import check_patterns

        check_patterns(self.include, "--include")
        check_patterns(self.exclude, "--exclude")
        self.validate_options()

    def for_model(self, model: Any) -> "CompressConfig":
        """This config, or (for a defaulted recipe the model cannot run) the same with the layer-by-layer default.

        ``kfac-global`` needs an LM loss through the whole model: a model without an LM head (an encoder
        without a task objective) gets ``svd-llm``.
        """
        if not (self.default_recipe and self.recipe == DEFAULT_RECIPE):
            return self
        from dataclasses import replace

        from .architectures import has_lm_head

        if has_lm_head(model):
            return self

        return replace(self, recipe=LAYERWISE_DEFAULT_RECIPE, base=None, allocator=None)

    def validate_options(self, from_cli: bool = False) -> None:
        """Refuse unknown or ill-typed method options now, before any long work (one error line)."""
        from .registry import check_options

        check_options("base", self.base, self.base_options, from_cli)
        check_options("allocator", self.allocator, self.allocator_options, from_cli)
        if self.trainer != "none":
            check_options("trainer", self.trainer, self.trainer_options, from_cli)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """What ranklm.json records as ``recipe.config``: ``to_dict()`` plus each axis's validated options,
        ``base_config`` / ``allocator_config`` / ``trainer_config`` = ``{"_type", "_version", "options"}``
        (``options.options_record``; None for no trainer, or a plugin without an options dataclass).
        ``config_from_recipe`` rebuilds the config from it."""
        from .registry import method_record

        out = self.to_dict()
        out["base_config"] = method_record("base", self.base, self.base_options)
        out["allocator_config"] = method_record("allocator", self.allocator, self.allocator_options)
        out["trainer_config"] = (None if self.trainer == "none"
                                 else method_record("trainer", self.trainer, self.trainer_options))
        return out

    @property
    def quant_spec(self) -> Any:
        """The parsed ``--quantize`` (``quantize.QuantSpec``), or None."""
        from .quantize.spec import parse_quantize

        return parse_quantize(self.quantize, int(self.quant_group_size))

    @property
    def method(self) -> str:
        """Human-readable name: the recipe if it is one, else base+allocator (+trainer)."""
        name = self.recipe or f"{self.base}+{self.allocator}"
        return name if self.trainer == "none" else f"{name}+{self.trainer}"


def run_args(run: dict[str, Any], config_cls: type | None = None, always: tuple[str, ...] = (),
             skip: tuple[str, ...] = ()) -> list[str]:
    """The command-line arguments that give ``run``'s values: every field that differs from its default,
    plus ``always`` (given even at the default); ``skip`` leaves fields out (the caller spells them)."""
    out: list[str] = []
    for f in run_fields(config_cls):
        if f.name not in run or f.name in skip:
            continue
        value = run[f.name]
        if value == field_default(f) and f.name not in always:
            continue
        flags = f.metadata["flag"].split(" ")[0]
        on, _, off = flags.partition("/")
        if off:  # a --flag/--no-flag pair (None = not given)
            if value is not None:
                out.append(on if value else off)
        elif isinstance(value, (list, tuple)):
            for item in value:
                out += [on, str(item)]
        elif value is not None:
            out += [on, f"{value:g}" if isinstance(value, float) else str(value)]
    return out


AXES = ("base", "allocator", "trainer")


def config_from_recipe(recipe: Mapping[str, Any]) -> CompressConfig:
    """The ``CompressConfig`` a checkpoint's recorded recipe describes (ranklm.json ``recipe``, or its ``config``).

    Each axis's options come from its typed record (``base_config`` etc., checked against the options
    dataclass the method declares now: type, version, every value validated again), else, for a recipe
    recorded before the typed records, from ``base_options`` etc. Python-only options (callables) are never
    recorded, so they are at their defaults. An unknown key or a bad record is one ``RanklmError`` line.
    """
    from .options import option_values, options_from_record
    from .registry import lookup, options_class

    config = recipe.get("config", recipe) if isinstance(recipe, Mapping) else None
    if not isinstance(config, Mapping):
        raise RanklmError("the recorded recipe holds no config object")
    names = {f.name for f in fields(CompressConfig)}
    typed = {f"{axis}_config" for axis in AXES}
    unknown = sorted(k for k in config if k not in names and k not in typed)
    if unknown:
        raise RanklmError(f"the recorded recipe config has keys this ranklm does not know: {', '.join(unknown)}")
    given = {k: v for k, v in config.items() if k in names}
    for axis in AXES:
        record, name = config.get(f"{axis}_config"), given.get(axis)
        if record is None or name in (None, "none"):
            continue
        found = options_class(lookup(axis, name))
        if found is None:
            raise RanklmError(f"the recorded recipe has typed options for {axis} {name}, which declares none")
        given[f"{axis}_options"] = option_values(options_from_record(axis, name, found, record))
    return CompressConfig(**given)
