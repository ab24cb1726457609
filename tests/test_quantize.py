"""Issue 29: weight-only quantization, bytes, the byte budget and the joint rank x width allocator (tiny models)."""

import itertools
import json
import random

import pytest
import torch

from conftest import make_model, random_ids
from ranklm.allocate.joint import Option, pareto, solve_joint
from ranklm.cli import main
from ranklm.config import CompressConfig
from ranklm.decompose import get_base
from ranklm.errors import RanklmError
from ranklm.modeling_ranklm import QuantizedLinear, pack_bits, unpack_bits
from ranklm.layers import LowRankLinear
from ranklm.pipeline import run
from ranklm.quantize.affine import dequantize_matrix, quantize_matrix
from ranklm.quantize.apply import check_quantizable
from ranklm.quantize.sizes import factored_bytes, quantized_bytes, stored_target_bytes
from ranklm.quantize.spec import QuantSpec, parse_budget_bytes, parse_quantize
from ranklm.targets import find_targets


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (7, 45), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, -(-45 * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, 45), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantized_layer_computes_with_the_dequantized_weight(bits):
    torch.manual_seed(0)
    w, bias = torch.randn(24, 40), torch.randn(24)  # 40 = 2.5 groups of 16, 24 neither: a padded last group
    layer = quantize_matrix(w, bits, 16, bias)
    deq = dequantize_matrix(w, bits, 16)
    assert torch.equal(layer.dequantized(torch.float32), deq)
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), x @ deq.T + bias)
    rel = float((deq - w).norm() / w.norm())
    assert rel < {2: 0.5, 3: 0.25, 4: 0.12, 8: 0.01}[bits]  # more bits, less error
    assert stored_target_bytes(layer) == quantized_bytes(24, 40, bits, 16)
    a = torch.randn(32, 19)  # a factor A: rank 19, output 32 = 2 groups: grouped along the output, no padding
    qa = quantize_matrix(a, bits, 16)
    assert qa.qweight.shape == (19, 32 * bits // 8) and qa.scale.shape == (19, 2)
    torch.testing.assert_close(qa(x[:, :19]), x[:, :19] @ dequantize_matrix(a, bits, 16).T)
    # integer buffers only: casting the model cannot change what is stored
    before = [t.clone() for t in (layer.qweight, layer.scale, layer.zero)]
    layer.to(torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(before, (layer.qweight, layer.scale, layer.zero)))


def _kfac_case(seed=0, out=24, inp=32, tokens=200):
    torch.manual_seed(seed)
    w = torch.randn(out, inp)
    x = torch.randn(tokens, inp) @ torch.randn(inp, inp) * 0.3
    g = torch.randn(tokens, out) @ torch.randn(out, out) * 0.3
    stats = {"gram": (x.T @ x).double(), "tokens": tokens, "out_gram": (g.T @ g).double(), "out_tokens": tokens, "name": "t"}
    return w, stats


def test_kfac_prices_quantization_on_the_truncation_scale():
    """The curve equals ½||L_G^T (W - Q(A_k) Q(B_k)) L_A||² where A's groups are whole, and the dense price
    ½||L_G^T (W - Q(W)) L_A||²; with no quantization it would be the truncation's ½Σσ²."""
    w, stats = _kfac_case()
    base = get_base("kfac", damping=0.0)
    base.quant_probe = QuantSpec((2, 4), 8)
    f = base.decompose(w, stats, 13)
    a_mean, g_mean = stats["gram"] / 200, stats["out_gram"] / 200

    def loss(wp):
        e = w.double() - wp.double()
        return 0.5 * float(torch.trace(g_mean @ e @ a_mean @ e.T))

    ql = f.meta["quant_loss"]
    for bits in (2, 4):
        for k in (5, 8, 11, 13):  # A grouped along its output, except at 8 (a multiple of the group size)
            direct = loss(dequantize_matrix(f.A[:, :k], bits, 8) @ dequantize_matrix(f.B[:k], bits, 8))
            assert ql["factored"][bits][k] == pytest.approx(direct, rel=1e-4)
        assert ql["dense"][bits] == pytest.approx(loss(dequantize_matrix(w, bits, 8)), rel=1e-4)
    assert ql["factored"][4][13] < ql["factored"][2][13]  # more bits, less loss
    plain = get_base("kfac", damping=0.0).decompose(w, stats, 13)
    assert "quant_loss" not in plain.meta
    assert torch.equal(plain.A, f.A) and torch.equal(plain.B, f.B)  # the probe changes nothing it returns


def test_joint_knapsack_matches_brute_force():
    rng = random.Random(3)
    for _ in range(40):
        options = [[Option(i, rng.choice((2, 4)), rng.randint(1, 40), rng.random() * 10) for i in range(5)]
                   for _ in range(4)]
        floor = sum(min(o.bytes for o in opts) for opts in options)
        budget = rng.randint(floor, floor + 60)
        best = min(sum(o.loss for o in c) for c in itertools.product(*options) if sum(o.bytes for o in c) <= budget)
        fronts = [pareto(opts) for opts in options]
        chosen, info = solve_joint(fronts, budget)
        got = [f[j] for f, j in zip(fronts, chosen)]
        assert sum(o.bytes for o in got) <= budget
        assert sum(o.loss for o in got) == pytest.approx(best, abs=1e-9)
    with pytest.raises(RanklmError, match="cannot be met"):
        solve_joint([[Option(1, 2, 10, 0.0)]], 5)


def _run(model, ids, **cfg):
    run(model, None, CompressConfig(**cfg), ids, progress=False)
    return model


def test_byte_budget_is_exact_and_every_target_stored_as_planned():
    model = make_model("llama")
    targets = find_targets(model)
    ids = random_ids(8, 64)
    dense_bytes = sum(t.dense_params for t in targets) * 4
    _run(model, ids, quantize="int2,int3,int4,int8", quant_group_size=16, budget_bytes="0.09", fisher_windows=8)
    st = model.ranklm
    q, joint = st.artifacts["quantization"], st.artifacts["joint"]
    assert q["target_bytes"] == joint["bytes_planned"]
    assert 0.995 * 0.09 * dense_bytes <= q["target_bytes"] <= 0.09 * dense_bytes
    for t in targets:
        m = model.get_submodule(t.name)
        bits = q["bits"][t.name]
        if isinstance(m, LowRankLinear):
            assert isinstance(m.A, QuantizedLinear) and m.A.bits == bits == m.B.bits
            assert stored_target_bytes(m) == factored_bytes(t.out_features, t.in_features, m.rank, bits, 16, 4)
        else:
            assert isinstance(m, QuantizedLinear) and m.bits == bits
    assert len(set(q["bits"].values())) > 1  # the budget is met by mixing widths, not one for all


def test_budget_bytes_without_quantize_is_the_keep_ratio_of_float_factors():
    model = _run(make_model("llama"), random_ids(8, 64), budget_bytes="0.5", fisher_windows=8)
    assert 0.995 * 0.5 <= model.ranklm.keep_achieved <= 0.5


def test_fixed_width_quantizes_every_target_after_compression():
    ids = random_ids(8, 64)
    ref = _run(make_model("llama"), ids, keep=0.6, recipe="svd")
    quant = _run(make_model("llama"), ids, keep=0.6, recipe="svd", quantize="int8", quant_group_size=32)
    assert ref.ranklm.rank_map == quant.ranklm.rank_map
    q = quant.ranklm.artifacts["quantization"]
    float32_bytes = sum(stored_target_bytes(ref.get_submodule(t.name)) for t in ref.ranklm.targets)
    assert float32_bytes / q["target_bytes"] >= 3.5
    with torch.no_grad():
        a, b = ref(ids[:2]).logits, quant(ids[:2]).logits
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())
    plain = _run(make_model("llama"), ids, keep=1.0, quantize="int4", quant_group_size=32)  # plain quantization
    assert all(isinstance(plain.get_submodule(t.name), QuantizedLinear) for t in plain.ranklm.targets)


def test_bad_quantization_input_is_one_error():
    with pytest.raises(RanklmError, match="unknown quantization width 'int9'"):
        parse_quantize("int9")
    with pytest.raises(RanklmError, match="unknown quantization width 'fp4'"):
        CompressConfig(quantize="fp4")
    with pytest.raises(RanklmError, match="give --budget-bytes"):
        CompressConfig(quantize="int2,int4")
    with pytest.raises(RanklmError, match="bad --budget-bytes"):
        CompressConfig(budget_bytes="lots")
    with pytest.raises(RanklmError, match="kfac"):
        _run(make_model("llama"), random_ids(), recipe="svd-llm", quantize="int4", budget_bytes="0.2")
    assert parse_budget_bytes("4bpw", 400, 100)[0] == 50
    assert parse_budget_bytes("2KiB", 400, 100)[0] == 2048
    model = make_model("llama")
    targets = find_targets(model)
    with pytest.raises(RanklmError, match="does not divide the input size 64"):
        check_quantizable(model, targets, 48)
    model.get_submodule(targets[0].name).weight = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.int8),
                                                                     requires_grad=False)
    with pytest.raises(RanklmError, match="cannot quantize model.layers.0.self_attn.q_proj"):
        check_quantizable(model, targets, 16)


@pytest.mark.parametrize("args,needle", [
    (["--quantize", "int9"], "unknown quantization width"),
    (["--quantize", "int4", "--quant-group-size", "48"], "does not divide the input size"),
])
def test_cli_bad_quantization_is_one_line(capsys, tiny_llama_dir, text_file, tmp_path, args, needle):
    out_dir = tmp_path / "ckpt"
    code = main(["compress", "--model", str(tiny_llama_dir), "--data", str(text_file), "--calib-windows", "4",
                 "--seq-len", "32", "--no-eval", "--output", str(out_dir), *args])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err and not out_dir.exists()


def test_cli_reports_bytes(capsys, tiny_llama_dir, text_file, tmp_path):
    code = main(["compress", "--model", str(tiny_llama_dir), "--data", str(text_file), "--calib-windows", "4",
                 "--fisher-windows", "4", "--seq-len", "32", "--no-eval", "--keep", "0.6", "--quantize", "int4",
                 "--quant-group-size", "16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["quantize"] == {"bits": [4], "group_size": 16}
    # keep 0.6 of the parameters at 4 bits + 3 bytes per group of 16 (5.5 bits): about 3.3 bits per dense weight
    assert out["target_bytes"] < out["target_bytes_dense"] and 3.0 < out["bits_per_target_weight"] < 3.5


def test_bench_byte_budgets_share_one_factorization(capsys, tiny_llama_dir, text_file, tmp_path):
    """bench columns as byte budgets: float factors, one width, and the joint allocator at the same bytes."""
    out = tmp_path / "bench"
    code = main(["bench", "--model", str(tiny_llama_dir), "--data", str(text_file),
                 "--recipes", "kfac-global,kfac-global:int4,kfac-global:int2/int4/int8", "--budget-bytes", "0.3,0.15",
                 "--calib-windows", "4", "--fisher-windows", "4", "--seq-len", "32", "--eval-windows", "2",
                 "--eval-seq-len", "32", "--gen-prompts", "0", "--quant-group-size", "16", "--memory-mode", "whole",
                 "--output", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    rows = json.loads(captured.out)["rows"]
    cells = {(r["method"], r["keep"]): r for r in rows if r["method"] != "dense"}
    assert len(cells) == 6 and all(r["status"] == "ok" for r in cells.values())
    dense_bytes = cells[("kfac-global", 0.3)]["target_bytes_dense"]
    for (method, budget), r in cells.items():
        assert r["target_bytes"] <= budget * dense_bytes
        assert "--budget-bytes" in r["command"] and "--keep" not in r["command"]
        if ":" in method:
            assert "--quantize" in r["command"]
    # at the same bytes, quantized factors keep more parameters than float ones
    assert cells[("kfac-global:int4", 0.15)]["keep_achieved"] > cells[("kfac-global", 0.15)]["keep_achieved"]
    assert "byte budget" in (out / "results.md").read_text()


def test_cli_plain_quantization_needs_no_calibration(capsys, tiny_llama_dir, tmp_path):
    """``--keep 1 --quantize int4``: the weight-only baseline in the same tool (no text is read for calibration)."""
    short = tmp_path / "short.txt"
    short.write_text("far too short for one calibration window")
    code = main(["compress", "--model", str(tiny_llama_dir), "--data", str(short), "--keep", "1", "--seq-len", "32",
                 "--quantize", "int4", "--quant-group-size", "16", "--no-eval", "--output", str(tmp_path / "q"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    out = json.loads(captured.out)
    assert out["keep_achieved"] == 1.0 and out["quantize"]["bits"] == [4]
    assert out["bits_per_target_weight"] == pytest.approx(4 + 3 * 8 / 16)
    import ranklm

    model, _ = ranklm.load(tmp_path / "q")
    assert all(isinstance(model.get_submodule(t.name), QuantizedLinear) for t in model.ranklm.targets)
    code = main(["evaluate", str(tmp_path / "q"), "--data", str(short), "--seq-len", "8", "--json"])
    ev = json.loads(capsys.readouterr().out)
    assert code == 0 and ev["target_bytes"] == out["target_bytes"] and ev["model_bytes"] == out["model_bytes"]


def test_solver_output_never_reaches_stdout(capfd):
    """HiGHS prints from C++ to fd 1 on some problems; --json on stdout must stay one object."""
    import os

    from ranklm.allocate.knapsack import solver_output_to_stderr

    with solver_output_to_stderr():
        os.write(1, b"HighsMipSolverData noise\n")
    out, err = capfd.readouterr()
    assert "noise" not in out and "noise" in err
