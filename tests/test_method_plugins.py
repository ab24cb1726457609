"""A method added from one module outside the package: registered by decorator, found through the
``ranklm.methods`` entry-point group (as an installed plugin package would be), run by ``ranklm compress``."""

import json
import sys
import textwrap

import pytest

from ranklm import registry
from ranklm.cli import main

PLUGIN = textwrap.dedent('''
    """A third-party ranklm plugin: one base and one allocator, nothing else touched."""
    import torch

    from ranklm.budget import max_factored_rank
    from ranklm.decompose.base import Factorization, split_sqrt, thin_svd
    from ranklm.options import Opt
    from ranklm.registry import register_allocator, register_base

    CALLS = {"base": 0, "allocator": 0}


    @register_base("plugin-svd")
    class PluginSVD:
        """Plain SVD, written outside ranklm."""
        needs = frozenset()
        loss_scale = None
        OPTIONS = ()

        def decompose(self, weight, stats, max_rank):
            CALLS["base"] += 1
            u, s, vt = thin_svd(weight.detach().double())
            a, b = split_sqrt(u, s, vt, max_rank)
            return Factorization(a.float(), b.float(), s.float(), meta={})


    @register_allocator("plugin-half")
    class PluginHalf:
        """Every target at the same fraction of its factored rank, then the exact budget fit."""
        needs_context = False
        needs_spectra = False
        OPTIONS = (Opt("start", float, 0.9, "first fraction tried"),)

        def __init__(self, start=0.9):
            self.start = start

        def allocate(self, targets, factorizations, keep, min_rank=1, context=None):
            CALLS["allocator"] += 1
            from ranklm.budget import fit_budget
            start = {t.name: max(1, int(self.start * max_factored_rank(t))) for t in targets}
            # the budget's exact fit (shrink/grow single ranks) by a priority of the plugin's own: larger matrices first
            return fit_budget(targets, start, keep, lambda t, k: float(t.out_features * t.in_features), 1)
''')


@pytest.fixture()
def plugin_on_path(tmp_path, monkeypatch):
    """The plugin module plus an installed distribution's entry point (a .dist-info folder on sys.path)."""
    (tmp_path / "ranklm_plugin_demo.py").write_text(PLUGIN)
    dist = tmp_path / "ranklm_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ranklm-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ranklm.methods]\ndemo = ranklm_plugin_demo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)  # rescan the entry points with the plugin installed
    yield
    registry.registered("base").pop("plugin-svd", None)
    registry.registered("allocator").pop("plugin-half", None)
    sys.modules.pop("ranklm_plugin_demo", None)


def test_a_base_and_an_allocator_from_one_plugin_module_run_through_compress(capsys, plugin_on_path, tiny_llama_dir,
                                                                           text_file, tmp_path):
    out_dir = tmp_path / "ckpt"
    code = main([str(a) for a in ("compress", tiny_llama_dir, "--data", text_file, "--base", "plugin-svd", "--allocator",
                                  "plugin-half", "--alloc-opt", "start=0.8", "--keep", "0.6", "--seq-len", "32",
                                  "--eval-seq-len", "32", "--calib-windows", "4", "--eval-windows", "2", "--batch-size", "2",
                                  "--output", out_dir, "--json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["base"] == "plugin-svd" and summary["allocator"] == "plugin-half"
    assert summary["keep_achieved"] <= 0.6
    plugin = sys.modules["ranklm_plugin_demo"]
    assert plugin.CALLS["base"] > 0 and plugin.CALLS["allocator"] == 1
    meta = json.loads((out_dir / "ranklm.json").read_text())
    assert meta["recipe"]["base"] == "plugin-svd" and meta["recipe"]["allocator"] == "plugin-half"

    code = main(["methods"])
    listing, _ = capsys.readouterr()
    assert "base plugin-svd" in listing and "allocator plugin-half" in listing and "start" in listing


def test_a_plugin_option_is_validated_like_a_built_in_one(capsys, plugin_on_path, tiny_llama_dir, text_file, tmp_path):
    code = main([str(a) for a in ("compress", tiny_llama_dir, "--data", text_file, "--base", "plugin-svd", "--allocator",
                                  "plugin-half", "--alloc-opt", "nope=1", "--output", tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 2 and "nope" in err and "start" in err and not (tmp_path / "o").exists()


def test_a_second_method_under_a_taken_name_is_refused():
    from ranklm.errors import RanklmError

    class Other:
        pass

    with pytest.raises(RanklmError, match="two bases named 'kfac'"):
        registry.register_base("kfac")(Other)
