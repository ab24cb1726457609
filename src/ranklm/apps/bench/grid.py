"""The grid a bench runs: methods (recipes or base+allocator pairs), keep ratios, shared options, and its result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...config import DEFAULT_CALIB_WINDOWS, RECIPES, CompressConfig, parse_option_value, field_default, resolve_keep, run_fields
from ...errors import RanklmError
from ...eval.latency import DEFAULT_DECODE, DEFAULT_SHAPES
from ...targets import Target


@dataclass(frozen=True)
class Method:
    """One row family of the grid: a recipe name or a ``base+allocator`` pair."""

    name: str
    base: str
    allocator: str
    recipe: str | None  # None when written as base+allocator and not a named recipe
    quantize: str | None = None  # ``kfac-global:int4`` or ``kfac-global:int2/int3/int4`` (joint): --quantize per row


def _method_quantize(spec: str) -> tuple[str, str | None]:
    """``recipe:int4`` -> (recipe, "int4"); ``recipe:int2/int4`` -> (recipe, "int2,int4"); widths validated."""
    from ...quantize.spec import parse_quantize

    method, sep, widths = spec.partition(":")
    if not sep:
        return spec, None
    quantize = ",".join(w.strip() for w in widths.split("/"))
    parse_quantize(quantize)
    return method.strip(), quantize


def parse_method(spec: str) -> Method:
    """``svd-llm`` (a recipe) or ``whiten+loss`` (base+allocator); unknown names raise RanklmError."""
    spec = spec.strip()
    if not spec:
        raise RanklmError("empty method name in --recipes")
    name, quantize = _method_quantize(spec)
    if "+" in name:
        b, _, a = name.partition("+")
        cfg = CompressConfig(recipe=None, base=b.strip(), allocator=a.strip())
        recipe = next((r for r, pair in RECIPES.items() if pair == (cfg.base, cfg.allocator)), None)
        return Method(spec, cfg.base, cfg.allocator, recipe, quantize)  # type: ignore[arg-type]
    cfg = CompressConfig(recipe=name)
    return Method(spec, cfg.base, cfg.allocator, name, quantize)  # type: ignore[arg-type]


def parse_methods(specs: str | list[str]) -> list[Method]:
    items = specs.split(",") if isinstance(specs, str) else [s for x in specs for s in x.split(",")]
    methods = [parse_method(s) for s in items if s.strip()]
    if not methods:
        raise RanklmError("--recipes names no method")
    names = [m.name for m in methods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RanklmError(f"--recipes names {', '.join(dup)} twice")
    return methods


def parse_byte_budgets(spec: str) -> list[float]:
    """Bench's ``--budget-bytes``: a comma list of fractions of the targets' dense bytes, the grid's columns."""
    out = []
    for x in str(spec).split(","):
        x = x.strip()
        if not x:
            continue
        try:
            f = float(x)
        except ValueError:
            raise RanklmError(f"bad --budget-bytes {x!r} for bench: give fractions of the targets' dense bytes "
                              "(0.5,0.25 = 8 and 4 bits per weight of a bfloat16 model)") from None
        if not 0.0 < f <= 1.0:
            raise RanklmError(f"bad --budget-bytes {x} for bench: a fraction in (0, 1]")
        out.append(f)
    if not out:
        raise RanklmError("--budget-bytes names no budget")
    return sorted(set(out), reverse=True)


def parse_keeps(spec: str | list[float]) -> list[float]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    keeps = []
    for x in items:
        if isinstance(x, str):
            x = x.strip()
            if not x:
                continue
            try:
                x = float(x)
            except ValueError:
                raise RanklmError(f"bad ratio --keep {x!r}: not a number") from None
        k = resolve_keep(float(x), None)
        if k >= 1.0:
            raise RanklmError("--keep 1.0 keeps every target dense: nothing to compress (the dense row is always included)")
        keeps.append(k)
    if not keeps:
        raise RanklmError("--keep names no ratio")
    return sorted(set(keeps), reverse=True)


def parse_scoped_options(items: list[str], flag: str) -> dict[str, dict[str, Any]]:
    """``["tfwsvd:adam_steps=40", "side=in"]`` -> ``{"tfwsvd": {...}, "*": {...}}`` (values parsed as JSON)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        scope, sep, rest = item.partition(":")
        if not sep or "=" in scope:
            scope, rest = "*", item
        key, eq, value = rest.partition("=")
        if not eq or not key.strip():
            raise RanklmError(f"{flag} expects [NAME:]KEY=VALUE, got {item!r}")
        out.setdefault(scope.strip(), {})[key.strip()] = parse_option_value(value)
    return out


def _scoped(options: dict[str, dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
    """A method's options: the unscoped ones it declares, then the ones scoped to its name (validated later)."""
    from ...registry import method_options

    declared = {o.name for o in method_options(kind, name)}
    shared = {k: v for k, v in options.get("*", {}).items() if k.replace("-", "_") in declared}
    return {**shared, **options.get(name, {})}


@dataclass
class BenchOptions:
    """A bench's settings: ``run`` = the CompressConfig run fields every cell shares (``--seq-len``,
    ``--round-to``, ``--trainer``, ...; the same fields ``compress`` takes), the per-name method options,
    and what bench itself measures."""

    run: dict[str, Any] = field(default_factory=dict)
    eval_seq_len: int = 512  # evaluation windows
    eval_windows: int | None = 40
    base_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # {base or "*": {k: v}}
    allocator_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    trainer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    gen_prompts: int = 20  # 0 = no generation-quality columns
    gen_prompt_len: int = 32
    gen_new_tokens: int = 64
    latency: bool = False
    latency_shapes: list[tuple[int, int]] = field(default_factory=lambda: list(DEFAULT_SHAPES))
    latency_reps: int = 5
    latency_warmup: int = 1
    decode: tuple[int, int] | None = DEFAULT_DECODE  # with latency: (prompt, new) tokens of the decode column; None = skip
    auto: bool = False
    auto_windows: int = 8  # held-out calibration windows for --auto
    save_best: str | None = None
    save_dir: str | None = None  # save every cell's model as save_dir/<method>@<keep> (ranklm checkpoints)
    rank_plot_keep: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        known = {f.name for f in run_fields()}
        unknown = sorted(set(self.run) - known)
        if unknown:
            raise RanklmError(f"bench run options this ranklm does not know: {', '.join(unknown)}")
        # the cells share one set of calibration windows, so "not given" means the default count for all of them
        self.run = {**{f.name: field_default(f) for f in run_fields()}, "calib_windows": DEFAULT_CALIB_WINDOWS, **{
            k: v for k, v in self.run.items() if not (k == "calib_windows" and v is None)}}
        # validated once, before any cell; read by the runner (a byte-budget list is the grid's columns: per cell)
        self.shared = CompressConfig(recipe=None, **{**self.run, "budget_bytes": None})

    @property
    def in_bytes(self) -> bool:
        """The columns are byte budgets (``--budget-bytes`` fractions), not keep ratios."""
        return self.run.get("budget_bytes") is not None

    def cell_run(self, method: Method, keep: float) -> dict[str, Any]:
        """The run fields of one cell: the shared ones, the method's ``--quantize``, the column's byte budget."""
        run = dict(self.run)
        if method.quantize is not None:
            run["quantize"] = method.quantize
        if self.in_bytes:
            run["budget_bytes"] = f"{keep:.12g}"  # the exact fraction: the cell's command must reproduce it
        return run

    def trainer_config(self) -> dict[str, Any]:
        """The trainer's options every cell shares (``--train-opt``); {} without a trainer."""
        trainer = self.run.get("trainer", "none") or "none"
        return _scoped(self.trainer_options, trainer, "trainer") if trainer != "none" else {}

    def cell_config(self, method: Method, keep: float) -> CompressConfig:
        """The CompressConfig of one cell: the shared run fields, the method, its options by name."""
        return CompressConfig(
            keep=keep, recipe=method.recipe, base=method.base, allocator=method.allocator, **self.cell_run(method, keep),
            base_options=_scoped(self.base_options, method.base, "base"),
            allocator_options=_scoped(self.allocator_options, method.allocator, "allocator"),
            trainer_options=self.trainer_config(),
        )


@dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    rank_maps: dict[str, dict[str, Any]]  # "method@keep" -> rank map
    targets: list[Target]
    best: dict[str, Any] | None = None
