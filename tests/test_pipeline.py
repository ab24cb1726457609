"""The one pipeline: bench == compress, trained factors survive, the training record, no import cycles."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import ranklm
from ranklm.allocate import ALLOCATORS
from ranklm.budget import DENSE
from ranklm.config import CompressConfig
from ranklm.layers import LowRankLinear

from conftest import make_model, outputs, random_ids

torch.set_num_threads(1)
SRC = Path(ranklm.__file__).parent
FAST = ["--calib-windows", "4", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--batch-size", "2"]


def _run(capsys, *args):
    from ranklm.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("mode", [[], ["--whole-model"]])
def test_bench_cell_equals_compress(mode, capsys, tiny_llama_dir, text_file, tmp_path):
    """Same recipe, calibration and evaluation: bench's cell and compress give one rank map and perplexity."""
    code, _, err = _run(capsys, "bench", "--model", tiny_llama_dir, "--data", text_file, "--recipes", "svd-llm,whiten+energy",
                        "--keep", "0.6", *FAST, "--gen-prompts", "0", *mode, "--output", tmp_path / "b")
    assert code == 0, err
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    for row in res["rows"][1:]:
        assert row["status"] == "ok", row["error"]
        cmd = row["command"].split()[1:]
        assert ("--whole-model" in cmd) == bool(mode)
        out_dir = cmd[cmd.index("--output") + 1]
        cmd[cmd.index("--output") + 1] = str(tmp_path / Path(out_dir).name)
        code, out, err = _run(capsys, *cmd, "--json")
        assert code == 0, err
        summary = json.loads(out)
        meta = json.loads((tmp_path / Path(out_dir).name / "ranklm.json").read_text())
        assert meta["rank_map"] == res["rank_maps"][f"{row['method']}@0.6"]
        assert summary["ppl_compressed"] == pytest.approx(row["ppl"], rel=1e-9)


class _TrainedFactorsAllocator:
    """A learning allocator that hands back its own (recognisable) factors, like SoftLMs will."""

    name = "trained-test"
    needs_context = True
    needs_spectra = True

    def allocate(self, targets, factorizations, keep, min_rank=1, context=None):
        from ranklm.allocate.uniform import UniformAllocator

        rank_map = UniformAllocator().allocate(targets, factorizations, keep, min_rank, context)
        g = torch.Generator().manual_seed(7)
        context.trained_factors = {
            t.name: (torch.randn(t.out_features, int(r), generator=g), torch.randn(int(r), t.in_features, generator=g))
            for t in targets if (r := rank_map[t.name]) != DENSE
        }
        context.training.append({"trainer": "trained-test", "stage": "allocate", "keep_learned": keep,
                                 "keep_requested": keep, "reached_budget": True})
        self.factors = context.trained_factors
        return rank_map


@pytest.mark.parametrize("base", ["whiten", "tfwsvd", "svd"])
def test_trained_factors_survive_refit_refine_install_and_reload(base, monkeypatch, tmp_path):
    alloc = _TrainedFactorsAllocator()
    monkeypatch.setitem(ALLOCATORS, "trained-test", lambda **_: alloc)
    model, ids = make_model("llama"), random_ids(8, 32)
    opts = {"adam_steps": 2, "sgd_steps": 1} if base == "tfwsvd" else {}
    cfg = CompressConfig(keep=0.5, base=base, allocator="trained-test", base_options=opts, fisher_windows=2)
    ranklm.compress(model, None, cfg, data=ids, progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert layers and set(layers) == set(alloc.factors)
    for name, (a, b) in alloc.factors.items():
        assert torch.equal(layers[name].A.weight, a) and torch.equal(layers[name].B.weight, b), name
    assert model.ranklm.training[0]["trainer"] == "trained-test"
    ckpt = ranklm.save(model, None, tmp_path / "ckpt")
    loaded, _ = ranklm.load(ckpt)
    for name, (a, b) in alloc.factors.items():
        m = loaded.get_submodule(name)
        assert torch.equal(m.A.weight, a) and torch.equal(m.B.weight, b), name
    assert torch.equal(outputs(model, ids), outputs(loaded, ids))


def test_finetune_trainer_is_recorded_and_saved(tmp_path):
    model, ids = make_model("llama"), random_ids(8, 32)
    cfg = CompressConfig(keep=0.5, recipe="svd", trainer="finetune", trainer_options={"steps": 5, "lr": 1e-2})
    ranklm.compress(model, None, cfg, data=ids, progress=False)
    rec = model.ranklm.training[-1]
    assert rec["trainer"] == "finetune" and rec["steps"] == 5 and len(rec["history"]["loss"]) == 5
    assert rec["final_loss"] < rec["first_loss"]
    assert model.ranklm.method == "svd+finetune"
    ckpt = ranklm.save(model, None, tmp_path / "ckpt")
    meta = json.loads((ckpt / "ranklm.json").read_text())
    assert meta["recipe"]["training"] == "finetune" and meta["training"][0]["options"]["lr"] == 1e-2
    loaded, _ = ranklm.load(ckpt)
    assert torch.equal(outputs(model, ids), outputs(loaded, ids))  # the trained factors were saved


def test_unknown_trainer_option_is_one_error_line(capsys, tiny_llama_dir, text_file):
    code, _, err = _run(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--trainer", "finetune",
                        "--train-opt", "nonsense=1", *FAST)
    assert code == 2 and err.strip().startswith("error:") and "nonsense" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--trainer", "finetune",
                        "--train-opt", "steps=abc", *FAST)
    assert code == 2 and "steps" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "compress", "--model", tiny_llama_dir, "--data", text_file, "--trainer", "nope", *FAST)
    assert code == 2 and "unknown trainer" in err


def _imports(path: Path) -> set[str]:
    """Every ranklm module a source file imports (module level and inside functions)."""
    mod = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    if path.name == "__init__.py":
        mod = mod[: -len(".__init__")]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            if name.startswith("ranklm"):
                out.add(name)
                out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ranklm"))
    return out


def test_checkpoint_code_does_not_import_the_pipeline_and_no_cycles_between_core_modules():
    files = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in SRC.rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}
    assert not graph["ranklm.io"] & {"ranklm.api", "ranklm.pipeline", "ranklm.apps.bench", "ranklm.apps", "ranklm.models"}
    assert "ranklm.io" not in graph["ranklm.architectures"]
    # models -> io (loading checkpoints) must not come back: io -> models
    assert "ranklm.models" not in graph["ranklm.io"]
    # nothing below the pipeline imports it
    for m in ("ranklm.io", "ranklm.state", "ranklm.layers", "ranklm.budget", "ranklm.targets", "ranklm.models"):
        assert "ranklm.pipeline" not in graph[m] and "ranklm.api" not in graph[m], m


def test_drivers_sit_on_top_nothing_below_imports_apps_or_cli():
    """cli -> apps -> pipeline -> methods -> core: only the CLI (and the package's own entry points) import the
    drivers, and nothing but ``__main__`` imports the CLI."""
    files = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in SRC.rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}
    for m, deps in graph.items():
        if not (m.startswith("ranklm.cli") or m.startswith("ranklm.apps")):
            assert not {d for d in deps if d.startswith("ranklm.apps")}, m
        if not (m.startswith("ranklm.cli") or m == "ranklm.__main__"):
            assert not {d for d in deps if d.startswith("ranklm.cli")}, m
