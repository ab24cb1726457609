"""Typed method options (DESIGN §1, §9): one validator, one error line, exit 2; the `methods` listing;
command-line usage errors as one line; `info` validating a checkpoint as `load` does."""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from ranklm.allocate import ALLOCATORS, get_allocator
from ranklm.cli import main
from ranklm.decompose import BASES, get_base
from ranklm.errors import RanklmError
from ranklm.options import (MethodOptions, Opt, describe_options, opt, option_spec, options_from_record, options_record,
                            parse_options, validate_options)
from ranklm.cli.tools import list_methods
from ranklm.registry import build, method_options

FAST = ["--calib-windows", "2", "--seq-len", "32", "--eval-windows", "1", "--batch-size", "2"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _bad(capsys, tmp_path, *args, match):
    """Exit 2, exactly one `error:` line containing ``match``, no traceback, nothing written."""
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, *args)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return lines[0]


# --------------------------------------------------------------------------- the validator

SPEC = (
    Opt("steps", int, 200, "steps"),
    Opt("lr", float, 1e-3, "learning rate"),
    Opt("flag", bool, True, "a switch"),
    Opt("mode", str, "a", "mode", choices=("a", "b")),
    Opt("grid", list, (0.5,), "ratios", item=float),
    Opt("limit", int, None, "optional limit"),
    Opt("loss_fn", object, None, "a callable", python_only=True),
)


def test_defaults_are_filled_in_and_values_coerced():
    v = validate_options("allocator", "x", SPEC, {"steps": 3.0, "lr": 2, "flag": "FALSE", "grid": (1, 0.25)})
    assert v == {"steps": 3, "lr": 2.0, "flag": False, "mode": "a", "grid": [1.0, 0.25], "limit": None, "loss_fn": None}
    assert type(v["steps"]) is int and type(v["lr"]) is float
    assert validate_options("allocator", "x", SPEC, {"limit": None})["limit"] is None
    assert validate_options("allocator", "x", SPEC, {"mode": "b"})["mode"] == "b"
    f = print
    assert validate_options("allocator", "x", SPEC, {"loss_fn": f})["loss_fn"] is f  # python-only: fine from Python


@pytest.mark.parametrize(
    "given, match",
    [
        ({"foo": 1}, "unknown option 'foo' for allocator x; valid options: steps, lr, flag, mode, grid, limit, loss_fn"),
        ({"steps": "abc"}, "option steps of allocator x must be an integer, got 'abc'"),
        ({"steps": True}, "option steps of allocator x must be an integer, got True"),
        ({"steps": 2.5}, "must be an integer"),
        ({"lr": "abc"}, "option lr of allocator x must be a float, got 'abc'"),
        ({"lr": False}, "must be a float"),
        ({"lr": float("inf")}, "must be a finite float"),
        ({"flag": 1}, "option flag of allocator x must be a boolean"),
        ({"flag": "yes"}, "must be a boolean"),
        ({"mode": 3}, "must be a string"),
        ({"mode": "c"}, "option mode of allocator x must be one of a, b, got 'c'"),
        ({"grid": 0.5}, "must be a list"),
        ({"grid": [0.5, "x"]}, "must be a list of floats"),
        ({"limit": "x"}, "must be an integer or null"),
        ({"steps": None}, "must be an integer"),  # None only where the default is None
        ({"steps": 1, "step-s": 2}, "unknown option 'step-s'"),
    ],
)
def test_bad_options_are_one_line_errors(given, match):
    with pytest.raises(RanklmError) as e:
        validate_options("allocator", "x", SPEC, given)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_dashes_and_underscores_are_the_same_key():
    assert validate_options("allocator", "x", (Opt("adam_steps", int, 1, "h"),), {"adam-steps": 4}) == {"adam_steps": 4}
    with pytest.raises(RanklmError, match="given twice"):
        validate_options("allocator", "x", (Opt("adam_steps", int, 1, "h"),), {"adam-steps": 4, "adam_steps": 5})


def test_python_only_options_are_refused_from_the_cli_and_hidden():
    with pytest.raises(RanklmError, match="loss_fn of allocator x can only be given from Python"):
        validate_options("allocator", "x", SPEC, {"loss_fn": "mymodule.f"}, from_cli=True)
    with pytest.raises(RanklmError) as e:
        validate_options("allocator", "x", SPEC, {"nope": 1}, from_cli=True)
    assert "loss_fn" not in str(e.value)
    text = describe_options("allocator", "x", SPEC)
    assert "loss_fn" not in text
    assert "steps" in text and "200" in text and "one of: a, b" in text and "[0.5]" in text


def test_options_without_declarations_fall_back_to_the_constructor():
    class Legacy:
        def __init__(self, a=1):
            self.a = a

    from ranklm import registry

    registry.register("trainer", "legacy")(Legacy)
    try:
        assert build("trainer", "legacy", {"a": 5}).a == 5
        with pytest.raises(RanklmError, match="unknown trainer 'nope'; valid trainers: finetune, heal, legacy"):
            build("trainer", "nope", {})
    finally:
        registry.registered("trainer").pop("legacy")


# --------------------------------------------------------------------------- the one declaration: an options dataclass

@dataclass(frozen=True)
class XOptions(MethodOptions):
    """SPEC above, declared the one way methods declare their options."""

    steps: int = opt(200, "steps")
    lr: float = opt(1e-3, "learning rate")
    flag: bool = opt(True, "a switch")
    mode: str = opt("a", "mode", choices=("a", "b"))
    grid: Sequence[float] = opt((0.5,), "ratios")
    limit: int | None = opt(None, "optional limit")
    loss_fn: Any = opt(None, "a callable", python_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 0:
            raise RanklmError("x steps must be >= 0")


def test_an_options_dataclass_derives_the_spec_validator_and_record():
    assert option_spec(XOptions) == SPEC
    assert validate_options("allocator", "x", XOptions, {"steps": 3.0}) == validate_options("allocator", "x", SPEC, {"steps": 3.0})
    assert describe_options("allocator", "x", XOptions) == describe_options("allocator", "x", SPEC)
    x = parse_options("allocator", "x", XOptions, {"steps": 3.0, "grid": (1, 0.25), "loss_fn": print})
    assert (x.steps, x.grid, x.loss_fn) == (3, [1.0, 0.25], print) and type(x.steps) is int
    with pytest.raises(RanklmError, match="x steps must be >= 0"):  # the dataclass's own rules
        parse_options("allocator", "x", XOptions, {"steps": -1})
    rec = options_record(x)
    assert rec == {"_type": "XOptions", "_version": 1,
                   "options": {"steps": 3, "lr": 1e-3, "flag": True, "mode": "a", "grid": [1.0, 0.25], "limit": None}}
    back = options_from_record("allocator", "x", XOptions, json.loads(json.dumps(rec)))
    assert back == XOptions(steps=3, grid=[1.0, 0.25])  # python-only options are not recorded
    with pytest.raises(RanklmError, match="are 'KFACOptions'; this ranklm's allocator x takes XOptions"):
        options_from_record("allocator", "x", XOptions, {**rec, "_type": "KFACOptions"})
    with pytest.raises(RanklmError, match="version 2; this ranklm reads version 1"):
        options_from_record("allocator", "x", XOptions, {**rec, "_version": 2})
    with pytest.raises(RanklmError, match="option steps of allocator x must be an integer"):
        options_from_record("allocator", "x", XOptions, {**rec, "options": {"steps": "many"}})


def _tables():
    from ranklm.train import TRAINERS

    return [("base", BASES), ("allocator", ALLOCATORS), ("trainer", TRAINERS)]


def test_every_method_declares_its_options_once_as_a_dataclass():
    import inspect

    from ranklm.registry import options_class

    for kind, table in _tables():
        for name, cls in table.items():
            options = options_class(cls)
            assert options is not None and not hasattr(cls, "OPTIONS"), f"{kind} {name}"
            assert method_options(kind, name) == option_spec(options)
            # the constructor takes the options instance (or keywords for the one validator), nothing re-declared
            params = inspect.signature(cls.__init__).parameters
            assert set(params) <= {"self", "options", "given"}, f"{kind} {name} re-declares {sorted(params)}"
            built = build(kind, name, {})
            assert built.config == options() and type(built.config) is options
            for o in option_spec(options):  # each option is an attribute too, unless the class uses the name
                if not hasattr(cls, o.name):
                    assert getattr(built, o.name) == o.default, f"{kind} {name} {o.name}"


def test_methods_get_the_validated_instance():
    from ranklm.decompose.kfac import KFACBase, KFACOptions

    b = get_base("kfac", damping=1)
    assert b.config == KFACOptions(damping=1.0) and b.damping == 1.0 and type(b.damping) is float
    assert KFACBase(KFACOptions(shrink=0.5)).shrink == 0.5
    assert KFACBase(shrink=0.5).config == KFACOptions(shrink=0.5)  # keywords: the one validator, then the dataclass
    with pytest.raises(RanklmError, match="option damping of base kfac must be a float"):
        KFACBase(damping="x")
    with pytest.raises(RanklmError, match="kfac damping must be >= 0"):
        KFACOptions(damping=-1.0)
    a = get_allocator("ars", steps=4, loss_fn=print)
    assert a.options()["steps"] == 4 and "loss_fn" not in a.options() and a.loss_fn is print


@pytest.mark.parametrize(
    "call",
    [
        lambda: get_base("whiten", nonsense=1),
        lambda: get_base("svd", alpha=0.5),
        lambda: get_base("asvd", nonsense=1),
        lambda: get_base("fwsvd", side=3),
        lambda: get_base("tfwsvd", adam_steps="abc"),
        lambda: get_allocator("uniform", windows=1),
        lambda: get_allocator("energy", foo=1),
        lambda: get_allocator("loss", mode="nope"),
        lambda: get_allocator("sensitivity", grid=[0.5, "a"]),
    ],
)
def test_python_api_refuses_unknown_and_ill_typed_options(call):
    with pytest.raises(RanklmError):
        call()


def test_python_api_accepts_declared_options():
    b = get_base("tfwsvd", side="in", adam_steps=3, sgd_steps=2.0, adam_lr=1, sgd_lr=0.25)
    assert (b.side, b.adam_steps, b.sgd_steps, b.adam_lr, b.sgd_lr, b.device) == ("in", 3, 2, 1.0, 0.25, None)
    a = get_allocator("sensitivity", grid=[0.2, 0.6], windows=2, cache="false")
    assert a.grid == (0.2, 0.6) and a.windows == 2 and a.cache is False
    assert get_base("asvd", alpha=1).alpha == 1.0


# --------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize(
    "flag, opt, match",
    [
        ("--base-opt", "foo=1", "unknown option 'foo' for base kfac; valid options: damping, shrink"),
        ("--alloc-opt", "foo=1", "unknown option 'foo' for allocator global; valid options:"),
    ],
)
def test_cli_unknown_option_for_default_recipe(capsys, tiny_llama_dir, text_file, tmp_path, flag, opt, match):
    _bad(capsys, tmp_path, "compress", "--model", tiny_llama_dir, "--data", text_file, "--output", tmp_path / "o",
         *FAST, flag, opt, match=match)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--base", "fwsvd", "--base-opt", "foo=1"], "unknown option 'foo' for base fwsvd; valid options: side"),
        (["--base", "fwsvd", "--base-opt", "side=3"], "option side of base fwsvd must be a string, got 3"),
        (["--base", "fwsvd", "--base-opt", "side=up"], "option side of base fwsvd must be one of out, in"),
        (["--base", "tfwsvd", "--base-opt", "adam_steps=abc"], "option adam_steps of base tfwsvd must be an integer, got 'abc'"),
        (["--base", "asvd", "--base-opt", "alpha=abc"], "option alpha of base asvd must be a float, got 'abc'"),
        (["--allocator", "loss", "--alloc-opt", "foo=1"], "unknown option 'foo' for allocator loss; valid options: group_by_type, mode"),
        (["--allocator", "loss", "--alloc-opt", "group_by_type=maybe"], "option group_by_type of allocator loss must be a boolean"),
        (["--allocator", "sensitivity", "--alloc-opt", "windows=abc"], "option windows of allocator sensitivity must be an integer"),
    ],
)
def test_cli_bad_method_options(capsys, tiny_llama_dir, text_file, tmp_path, extra, match):
    _bad(capsys, tmp_path, "compress", "--model", tiny_llama_dir, "--data", text_file, "--output", tmp_path / "o",
         *FAST, *extra, match=match)


@pytest.mark.parametrize(
    "args, match",
    [
        (["compress", "--keep", "abc"], "Invalid value for '--keep'"),
        (["compress", "--no-such-flag"], "No such option: --no-such-flag"),
        (["evaluate", "--windows", "x"], "Invalid value for '--windows'"),
        (["generate"], "Missing option '--prompt'"),
        (["no-such-command"], "No such command"),
    ],
)
def test_command_line_usage_errors_are_one_line(capsys, tmp_path, args, match):
    _bad(capsys, tmp_path, *args, match=match)


def test_help_still_exits_0(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and "compress" in out and "methods" in out


def test_methods_lists_every_method_with_its_defaults(capsys):
    code, out, err = run(capsys, "methods")
    assert code == 0, err
    assert out.strip() == list_methods().strip()
    for name in BASES:
        assert f"base {name}\n" in out
    for name in ALLOCATORS:
        assert f"allocator {name}\n" in out
    for name in ("svd-llm", "svd-llm-v2", "asvd"):
        assert f"    {name} " in out
    lines = out.splitlines()

    def option_line(kind, method, option):
        start = lines.index(f"{kind} {method}")
        for ln in lines[start + 1:]:
            if not ln.startswith("    "):
                break
            if ln.split()[0] == option:
                return ln
        raise AssertionError(f"{option} not listed under {kind} {method}:\n{out}")

    assert "default 0.5" in option_line("base", "asvd", "alpha")
    assert "default out" in option_line("base", "fwsvd", "side") and "one of: out, in" in option_line("base", "fwsvd", "side")
    assert "default 100" in option_line("base", "tfwsvd", "adam_steps")
    assert "default null" in option_line("base", "tfwsvd", "device")
    assert "default true" in option_line("allocator", "loss", "group_by_type")
    assert "default v2" in option_line("allocator", "loss", "mode")
    assert "default 4" in option_line("allocator", "sensitivity", "windows")
    assert "list[float]" in option_line("allocator", "sensitivity", "grid")
    assert lines[lines.index("base svd") + 1].strip() == "(no options)"
    assert "default 0.0" in option_line("base", "whiten", "shrink") and "(in [0, 1])" in option_line("base", "whiten", "shrink")


# --------------------------------------------------------------------------- info validates like load

@pytest.fixture()
def ckpt(capsys, tiny_llama_dir, text_file, tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "ckpt"
    code, _, err = run(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--output", d, "--no-eval",
                       "--calib-windows", "4", "--seq-len", "32", "--batch-size", "2")
    assert code == 0, err
    return d


def _edit_compression(ckpt, edit):
    from conftest import edit_compression

    edit_compression(ckpt, edit)


def test_a_checkpoints_recipe_rebuilds_its_config(ckpt):
    from ranklm.config import CompressConfig, config_from_recipe

    recipe = json.loads((ckpt / "ranklm.json").read_text())["recipe"]
    config = recipe["config"]
    assert config["base_config"] == {"_type": "KFACOptions", "_version": 1, "options": {"damping": 1e-6, "shrink": 0.0}}
    assert config["allocator_config"]["_type"] == "GlobalOptions" and config["trainer_config"] is None
    rebuilt = config_from_recipe(recipe)
    assert isinstance(rebuilt, CompressConfig) and rebuilt.method == recipe["name"] == "kfac-global"
    again = rebuilt.record()
    for key in ("base_config", "allocator_config", "trainer_config", "keep", "seed", "calib_windows", "seq_len", "recipe"):
        assert again[key] == config[key], key
    # a recipe recorded before the typed records: the plain option dicts
    old = {k: v for k, v in config.items() if not k.endswith("_config")}
    assert config_from_recipe(old).record()["base_config"] == config["base_config"]
    with pytest.raises(RanklmError, match="option shrink of base kfac must lie in"):
        config_from_recipe({**config, "base_config": {**config["base_config"], "options": {"shrink": 2.0}}})
    with pytest.raises(RanklmError, match="keys this ranklm does not know: nope"):
        config_from_recipe({**config, "nope": 1})


def test_info_on_a_good_checkpoint(capsys, ckpt):
    code, out, err = run(capsys, "info", ckpt)
    assert code == 0, err
    assert "model.layers.0.self_attn.q_proj" in out
    code, out, err = run(capsys, "info", ckpt, "--json")
    assert code == 0 and json.loads(out)["rank_map"]


def _name_a_missing_module(meta):
    meta["rank_map"]["model.layers.7.self_attn.q_proj"] = 4
    meta["modules"]["model.layers.7.self_attn.q_proj"] = {"out": 64, "in": 64, "kind": "linear"}


def _rank_map_without_shape_entry(meta):
    meta["rank_map"]["model.layers.7.self_attn.q_proj"] = 4


def _wrong_shape(meta):
    name = next(iter(meta["rank_map"]))
    meta["modules"][name]["out"] += 1


def _bad_rank(meta):
    name = next(iter(meta["rank_map"]))
    meta["rank_map"][name] = 10_000


def _not_a_linear_layer(meta):
    meta["rank_map"]["model.layers.0.input_layernorm"] = 4
    meta["modules"]["model.layers.0.input_layernorm"] = {"out": 64, "in": 64, "kind": "linear"}


def _bad_modules_entry(meta):
    name = next(iter(meta["rank_map"]))
    meta["modules"][name] = {"out": "64"}


@pytest.mark.parametrize(
    "edit, match",
    [
        (_name_a_missing_module, "does not fit the model: it names model.layers.7.self_attn.q_proj"),
        (_rank_map_without_shape_entry, "rank map does not fit the model: model.layers.7.self_attn.q_proj has no shape entry"),
        (_wrong_shape, "does not fit the model"),
        (_bad_rank, "bad rank 10000"),
        (_not_a_linear_layer, "not a linear layer"),
        (_bad_modules_entry, "bad shape entry"),
    ],
)
def test_info_refuses_what_evaluate_refuses(capsys, ckpt, tmp_path, edit, match):
    _edit_compression(ckpt, edit)
    line = _bad(capsys, tmp_path, "info", ckpt, match=match)
    assert _bad(capsys, tmp_path, "info", ckpt, "--json", match=match) == line
    # evaluate (ranklm.load) refuses the same folder with the same line
    assert _bad(capsys, tmp_path, "evaluate", ckpt, "--windows", "1", "--seq-len", "32", match=match) == line


def test_info_checks_file_hashes(capsys, ckpt, tmp_path):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    _bad(capsys, tmp_path, "info", ckpt, match="hash mismatch")


def test_learning_allocators_default_to_fewer_calibration_windows():
    from ranklm.config import DEFAULT_CALIB_WINDOWS, CompressConfig

    assert CompressConfig(keep=0.6).calib_windows == DEFAULT_CALIB_WINDOWS
    assert CompressConfig(keep=0.6, base="whiten", allocator="ars").calib_windows == 32
    assert CompressConfig(keep=0.6, base="whiten", allocator="softlm").calib_windows == 32
    assert CompressConfig(keep=0.6, base="whiten", allocator="ars", calib_windows=8).calib_windows == 8


def test_kfac_global_recipe_names_its_axes():
    from ranklm.config import CompressConfig

    c = CompressConfig(keep=0.8, recipe="kfac-global")
    assert (c.base, c.allocator, c.method) == ("kfac", "global", "kfac-global")


def test_default_recipe_resolution():
    """kfac-global by default; svd-llm where it cannot run (no LM head, --sequential); named recipes never change."""
    from conftest import make_model

    from ranklm.config import DEFAULT_RECIPE, LAYERWISE_DEFAULT_RECIPE, CompressConfig

    cfg = CompressConfig(keep=0.6)
    assert (cfg.recipe, cfg.base, cfg.allocator, cfg.default_recipe) == (DEFAULT_RECIPE, "kfac", "global", True)
    assert cfg.for_model(make_model("llama")) is cfg
    enc = cfg.for_model(make_model("bert"))
    assert (enc.recipe, enc.base, enc.allocator, enc.keep) == (LAYERWISE_DEFAULT_RECIPE, "whiten", "uniform", 0.6)
    assert CompressConfig(sequential=True).recipe == LAYERWISE_DEFAULT_RECIPE
    assert (CompressConfig(base="svd").base, CompressConfig(base="svd").allocator) == ("svd", "uniform")
    named = CompressConfig(recipe="kfac-global")
    assert not named.default_recipe and named.for_model(make_model("bert")) is named
