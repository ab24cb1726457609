"""A calibration statistic added from one module outside ranklm, read by a base registered the same way, run by the CLI.

The module below is written to tmp_path and imported from there: its ``@register_statistic`` and
``@register_base`` decorators are all it takes. ``rms_in`` (activation: per-channel mean of x^2)
is collected block by block by default and in one forward pass with ``--whole-model``;
``out_grad_abs`` (gradient: per-channel sum of |dL/dy|) needs end-to-end backward passes, so a
base that reads it calibrates on the whole model.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest

from ranklm import registry
from ranklm.cli import main

PLUGIN = textwrap.dedent('''
    import torch

    from ranklm.calibration.accumulate import add_sum
    from ranklm.calibration.statistic import ACTIVATION, GRADIENT, INPUT, OUTPUT_GRAD, Statistic
    from ranklm.decompose.base import Factorization, split_sqrt, thin_svd
    from ranklm.registry import register_base, register_statistic

    CALLS = {"rms_in": 0, "out_grad_abs": 0, "decompose": 0}


    @register_statistic("rms_in")
    class RMSIn(Statistic):
        kind, reads, keys = ACTIVATION, INPUT, ("rms_in",)

        def update(self, acc, x, module, scale):
            CALLS["rms_in"] += 1
            return add_sum(acc, x.square().sum(0).to(device="cpu", dtype=torch.float64))

        def finalize(self, acc, tokens, name, module):
            return {"rms_in": (acc / tokens).sqrt()}


    @register_statistic("out_grad_abs")
    class OutGradAbs(Statistic):
        kind, reads, keys, summed_loss = GRADIENT, OUTPUT_GRAD, ("out_grad_abs",), True

        def update(self, acc, g, module, scale):
            CALLS["out_grad_abs"] += 1
            return add_sum(acc, g.abs().sum(0).to(device="cpu", dtype=torch.float64))

        def finalize(self, acc, tokens, name, module):
            return {"out_grad_abs": acc / tokens}


    class _Scaled:
        OPTIONS = ()

        def decompose(self, weight, stats, max_rank):
            CALLS["decompose"] += 1
            assert stats["tokens"] > 0
            col = stats["rms_in"].clamp_min(1e-6)
            row = stats["out_grad_abs"].clamp_min(1e-12) if "out_grad_abs" in stats else torch.ones(weight.shape[0], dtype=torch.float64)
            w = weight.detach().double() * row[:, None] * col[None, :]
            u, s, vt = thin_svd(w)
            a, b = split_sqrt(u, s, vt, max_rank)
            return Factorization((a / row[:, None]).float(), (b / col[None, :]).float(), s.float())


    @register_base("rmsbase")
    class RMSBase(_Scaled):
        name = "rmsbase"
        needs = frozenset({"rms_in"})


    @register_base("rmsgradbase")
    class RMSGradBase(_Scaled):
        name = "rmsgradbase"
        needs = frozenset({"rms_in", "out_grad_abs"})
''')

FAST = ["--calib-windows", "4", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--batch-size", "2"]


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "my_rms_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("my_rms_plugin")
    try:
        yield module
    finally:
        for kind, name in (("statistic", "rms_in"), ("statistic", "out_grad_abs"), ("base", "rmsbase"), ("base", "rmsgradbase")):
            registry.registered(kind).pop(name, None)
        sys.modules.pop("my_rms_plugin", None)


@pytest.mark.parametrize("base,extra", [("rmsbase", []), ("rmsbase", ["--whole-model"]), ("rmsgradbase", ["--fisher-windows", "2"])])
def test_a_statistic_from_one_module_runs_through_compress(plugin, base, extra, capsys, tiny_llama_dir, text_file, tmp_path):
    from ranklm.calibration import ACTIVATION, GRADIENT, StatisticNames, blockwise

    assert "rms_in" in StatisticNames(ACTIVATION) and "out_grad_abs" in StatisticNames(GRADIENT)
    assert blockwise(registry.lookup("base", base).needs) == (base == "rmsbase")
    out_dir = tmp_path / "ckpt"
    code = main(["compress", "--model", str(tiny_llama_dir), "--data", str(text_file), "--keep", "0.6",
                 "--base", base, "--allocator", "uniform", "--output", str(out_dir), *FAST, *extra, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert 0.6 * 0.995 <= summary["keep_achieved"] <= 0.6 and summary["ppl_compressed"] > 1
    record = json.loads((out_dir / "ranklm.json").read_text())
    # an activation statistic is collected block by block (the refit pass) unless --whole-model; a gradient one never
    assert ("refit_statistics_s" in record["timings"]) == (base == "rmsbase" and not extra)
    assert base in json.dumps(record["recipe"])
    n_targets = 2 * 7  # tiny llama: 2 blocks x (q, k, v, o, gate, up, down)
    assert plugin.CALLS["decompose"] >= n_targets
    # q/k/v and gate/up share one input: 4 distinct inputs per block, 2 batches of calibration windows
    assert plugin.CALLS["rms_in"] >= 2 * 4 * 2
    assert (plugin.CALLS["out_grad_abs"] > 0) == (base == "rmsgradbase")


def test_cleanup_left_no_entry():
    assert "rms_in" not in registry.registered("statistic") and "rmsbase" not in registry.registered("base")
