"""Latency (speed-up vs FLOP limit), generation metrics, `ranklm generate`, `evaluate --latency` and the lm-eval bridge."""

from __future__ import annotations

import copy
import importlib.util
import json
import math

import pytest
import torch

import ranklm
from ranklm.cli import main
from ranklm.eval.generate import (
    distinct_n,
    generation_quality,
    greedy_continuations,
    prompts_from_stream,
    quality_of,
    repeat_ngram_rate,
)
from ranklm.eval.decode_timing import _greedy_decode, _greedy_decode_static
from ranklm.eval.latency import (
    dense_counterpart,
    flop_ratio_limit,
    measure_decode,
    measure_latency,
    parse_decode_tokens,
    parse_shapes,
    target_macs,
    tensor_core_note,
    weight_bytes_per_token,
)
from ranklm.targets import Target

from conftest import make_model, random_ids


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- generation metrics on hand-made lists


def test_distinct2_by_hand():
    assert distinct_n([1, 2, 3, 4], 2) == 1.0  # (1,2) (2,3) (3,4)
    assert distinct_n([1, 2, 1, 2, 1], 2) == pytest.approx(2 / 4)  # (1,2) (2,1) (1,2) (2,1)
    assert distinct_n([7, 7, 7, 7, 7], 2) == pytest.approx(1 / 4)
    assert distinct_n([5, 6, 5, 7], 2) == 1.0
    assert math.isnan(distinct_n([3], 2)) and math.isnan(distinct_n([], 2))


def test_repeat4_by_hand():
    assert repeat_ngram_rate([1, 2, 3, 4, 5, 6], 4) == 0.0
    # 4-grams: 1234 2341 3412 4123 1234* 2341* -> 2 of 6 already seen
    assert repeat_ngram_rate([1, 2, 3, 4, 1, 2, 3, 4, 1], 4) == pytest.approx(2 / 6)
    assert repeat_ngram_rate([9] * 7, 4) == pytest.approx(3 / 4)  # first 9999 new, the next 3 repeats
    assert math.isnan(repeat_ngram_rate([1, 2, 3], 4))


def test_quality_means_over_prompts_and_skips_short():
    q = quality_of([[1, 2, 3, 4], [7, 7, 7, 7, 7], [4]], prompt_len=8, new_tokens=5)
    assert q.distinct2 == pytest.approx((1.0 + 0.25) / 2)
    assert q.repeat4 == pytest.approx((0.0 + 0.5) / 2)  # [4] has no bigram/4-gram and is left out
    assert q.prompts == 3


def test_prompts_evenly_spaced():
    stream = torch.arange(1000)
    p = prompts_from_stream(stream, n_prompts=5, prompt_len=10, span=20)
    assert p.shape == (5, 10)
    starts = p[:, 0].tolist()
    assert starts[0] == 0 and starts[-1] == 1000 - 10 - 20
    assert all(b > a for a, b in zip(starts, starts[1:]))
    assert torch.equal(p[2], torch.arange(starts[2], starts[2] + 10))


def test_generation_quality_on_tiny_model_is_deterministic():
    model = make_model("llama")
    prompts = random_ids(4, 6)
    conts = greedy_continuations(model, prompts, max_new_tokens=12)
    assert len(conts) == 4 and all(1 <= len(c) <= 12 for c in conts)
    # greedy continuation equals step-by-step argmax
    ids = prompts[:1]
    with torch.no_grad():
        for _ in range(len(conts[0])):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert ids[0, 6:].tolist() == conts[0]
    q = generation_quality(model, prompts, 12)
    assert q == generation_quality(model, prompts, 12)
    assert 0 < q.distinct2 <= 1 and 0 <= q.repeat4 <= 1


# ---------------------------------------------------------------- latency


def _compressed(keep=0.4, recipe="svd"):
    model = make_model("llama")
    dense = copy.deepcopy(model)
    ranklm.compress(model, None, ranklm.CompressConfig(keep=keep, recipe=recipe), progress=False)
    return dense, model


def test_flop_ratio_by_hand():
    ts = [Target("a", 64, 64, "linear", 0), Target("b", 160, 64, "linear", 0)]
    assert target_macs(ts) == 64 * 64 + 160 * 64
    rm = {"a": 8, "b": "dense"}
    assert target_macs(ts, rm) == 8 * 128 + 160 * 64
    assert flop_ratio_limit(ts, rm) == pytest.approx((64 * 64 + 160 * 64) / (8 * 128 + 160 * 64))


def test_latency_speedups_finite_positive_and_flop_limit_above_one():
    dense, comp = _compressed(0.4)
    res = measure_latency(dense, comp, [(1, 16), (2, 32)], reps=3, warmup=1)
    assert [(p.batch, p.seq_len) for p in res.points] == [(1, 16), (2, 32)]
    for p in res.points:
        assert math.isfinite(p.speedup) and p.speedup > 0 and p.dense_ms > 0 and p.compressed_ms > 0
        assert p.speedup == pytest.approx(p.dense_ms / p.compressed_ms)
    assert res.flop_ratio_limit == pytest.approx(1 / comp.ranklm.keep_achieved)
    assert res.flop_ratio_limit > 2
    assert res.speedup == res.point(2, 32).speedup  # no 8x512: the largest shape is the headline
    d = res.to_dict()
    assert set(d) >= {"speedup", "flop_ratio_limit", "points"}
    # LM head and embeddings stay dense: the whole-forward linear FLOP ratio lies between 1 and the targets' limit
    assert 1 < d["flop_ratio_linear_layers"] < res.flop_ratio_limit


def test_dense_counterpart_matches_compressed_outputs():
    _, comp = _compressed(0.5)
    dense = dense_counterpart(comp)
    assert hasattr(comp, "ranklm") and not any(type(m).__name__ == "LowRankLinear" for m in dense.modules())
    ids = random_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, comp(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_parse_shapes():
    assert parse_shapes("1x128, 8X512") == [(1, 128), (8, 512)]
    with pytest.raises(ranklm.RanklmError):
        parse_shapes("8*512")


# ---------------------------------------------------------------- decode (generation with a KV cache)


def test_decode_feeds_one_token_per_step_through_the_kv_cache():
    """Fails if the decode loop runs without the cache (use_cache off: whole sequences, no past)."""
    dense, comp = _compressed(0.5)
    seen: list[tuple[int, int]] = []  # (tokens fed, cached length) per forward of the compressed model

    def spy(module, args, kwargs):
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.x: cache
        assert kwargs.get("use_cache") is True
        seen.append((kwargs["input_ids"].shape[1], 0 if past is None else past.get_seq_length()))

    handle = comp.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        res = measure_decode(dense, comp, prompt_len=6, new_tokens=5, reps=1, warmup=0)
    finally:
        handle.remove()
    assert seen == [(6, 0)] + [(1, 6 + i) for i in range(5)]
    assert res.new_tokens == 5 and res.prompt_len == 6 and res.reps == 1
    assert all(math.isfinite(v) and v > 0 for v in (res.dense_tok_s, res.compressed_tok_s, res.speedup))
    assert res.speedup == pytest.approx(res.compressed_tok_s / res.dense_tok_s)


def test_greedy_decode_matches_transformers_generate():
    model = make_model("llama")
    prompt = random_ids(1, 7)
    with torch.inference_mode():
        tokens, seconds = _greedy_decode(model, prompt, 9)
        ref = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert seconds > 0
    assert tokens == ref[0, 8:].tolist()  # the first new token comes from the (untimed) prefill


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_cache_decode_gives_the_dynamic_cache_tokens(arch):
    """The step that --cuda-graphs captures (fixed token/position tensors, static KV cache), run eagerly:
    fails if it feeds the wrong position or token back, or misses the cache (logits compared per step)."""
    model = make_model(arch)
    prompt = random_ids(1, 7)
    logits: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda mod, args, out: logits.append(out.logits[:, -1].clone()))
    try:
        with torch.inference_mode():
            ref, _ = _greedy_decode(model, prompt, 9)
            n = len(logits)
            tokens, seconds = _greedy_decode_static(model, prompt, 9)
    finally:
        handle.remove()
    assert seconds > 0 and tokens == ref
    assert n == 10 and len(logits) == 20  # prefill + 9 steps each
    for a, b in zip(logits[:n], logits[n:]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_cuda_graphs_refused_off_gpu(capsys, tiny_ckpt, text_file):
    dense, comp = _compressed(0.5)
    with pytest.raises(ranklm.RanklmError, match="CUDA device"):
        measure_latency(dense, comp, [(1, 8)], reps=1, warmup=0, cuda_graphs=True)
    with pytest.raises(ranklm.RanklmError, match="CUDA device"):
        measure_decode(dense, comp, 4, 2, reps=1, warmup=0, cuda_graphs=True)
    code, out, err = run(capsys, "evaluate", tiny_ckpt, "--data", text_file, "--seq-len", "32", "--windows", "1",
                         "--latency", "--cuda-graphs")
    assert code == 2 and "--cuda-graphs needs --latency and --device cuda" in err


def test_tensor_core_note_only_for_half_precision_on_a_gpu_with_unaligned_ranks():
    from ranklm.layers import LowRankLinear

    _, comp = _compressed(0.5)
    ranks = [m.rank for m in comp.modules() if isinstance(m, LowRankLinear)]
    cuda = torch.device("cuda")
    assert tensor_core_note(comp, torch.device("cpu"), torch.bfloat16) is None
    assert tensor_core_note(comp, cuda, torch.float32) is None
    odd = sum(r % 8 != 0 for r in ranks)
    note = tensor_core_note(comp, cuda, torch.bfloat16)
    assert (note is None) == (odd == 0)
    if note:
        assert f"{odd} of {len(ranks)} factored layers" in note and "--round-to 32" in note and "bfloat16" in note
    for m in comp.modules():  # every rank a multiple of 8: no note
        if isinstance(m, LowRankLinear):
            m.rank = 8 * max(1, m.rank // 8)
    assert tensor_core_note(comp, cuda, torch.float16) is None


def test_weight_bytes_per_token_by_hand():
    dense, comp = _compressed(0.5)
    linear = sum(m.weight.numel() for m in dense.modules() if isinstance(m, torch.nn.Linear))  # no biases in Llama
    assert weight_bytes_per_token(dense) == 4 * (linear + 64)  # float32, + one embedding row (hidden 64)
    targets, rank_map = comp.ranklm.targets, comp.ranklm.rank_map
    head = 4 * (dense.lm_head.weight.numel() + 64)
    assert weight_bytes_per_token(comp) == 4 * target_macs(targets, rank_map) + head
    assert weight_bytes_per_token(dense) == 4 * target_macs(targets) + head
    limit = measure_decode(dense, comp, 4, 2, reps=1, warmup=0).limit
    assert limit == pytest.approx(weight_bytes_per_token(dense) / weight_bytes_per_token(comp))
    assert 1 < limit < flop_ratio_limit(targets, rank_map)  # the dense LM head is read every token


def test_parse_decode_tokens():
    assert parse_decode_tokens("128x64") == (128, 64)
    assert parse_decode_tokens("0") is None
    for bad in ("128", "0x5", "ax5"):
        with pytest.raises(ranklm.RanklmError):
            parse_decode_tokens(bad)


def test_decode_longer_than_positions_refused():
    dense, comp = _compressed(0.5)
    with pytest.raises(ranklm.RanklmError, match="positions"):
        measure_decode(dense, comp, 200, 100, reps=1, warmup=0)


# ---------------------------------------------------------------- CLI: evaluate --latency, generate


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_llama_dir):
    from ranklm.models import load_model

    model, tok, info = load_model(str(tiny_llama_dir))
    ranklm.compress(model, tok, ranklm.CompressConfig(keep=0.5, recipe="svd"), progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "svd-0.5"
    ranklm.save(model, tok, out)
    return out


def test_evaluate_latency_json(capsys, tiny_ckpt, text_file):
    code, out, err = run(capsys, "evaluate", tiny_ckpt, "--data", text_file, "--seq-len", "32", "--windows", "2",
                         "--latency", "--latency-shapes", "1x16,8x64", "--latency-reps", "2", "--latency-warmup", "1",
                         "--decode-tokens", "8x6", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert math.isfinite(res["decode_speedup"]) and res["decode_speedup"] > 0
    assert math.isfinite(res["decode_limit"]) and 1 < res["decode_limit"] < res["flop_ratio_limit"]
    dec = res["latency"]["decode"]
    assert (dec["prompt_len"], dec["new_tokens"], dec["speedup"]) == (8, 6, res["decode_speedup"])
    assert math.isfinite(res["speedup"]) and res["speedup"] > 0
    assert res["flop_ratio_limit"] == pytest.approx(1 / res["keep_achieved"]) and res["flop_ratio_limit"] > 1.9
    assert [tuple(p[k] for k in ("batch", "seq_len")) for p in res["latency"]["points"]] == [(1, 16), (8, 64)]
    assert res["speedup"] == res["latency"]["points"][1]["speedup"]


def test_evaluate_latency_text_and_dense_model_refused(capsys, tiny_ckpt, tiny_llama_dir, text_file):
    code, out, err = run(capsys, "evaluate", tiny_ckpt, "--data", text_file, "--seq-len", "32", "--windows", "1",
                         "--latency", "--latency-shapes", "1x8", "--latency-reps", "1", "--decode-tokens", "4x3")
    assert code == 0, err
    assert "FLOP-ratio limit" in out and "speed-up" in out
    assert "decode (batch 1, KV cache, 3 new tokens after a 4-token prompt)" in out and "weight-bytes limit" in out
    code, out, err = run(capsys, "evaluate", tiny_ckpt, "--data", text_file, "--seq-len", "32", "--windows", "1",
                         "--latency", "--latency-shapes", "1x8", "--latency-reps", "1", "--decode-tokens", "0", "--json")
    assert code == 0, err
    assert "decode_speedup" not in json.loads(out) and "decode" not in json.loads(out)["latency"]
    code, out, err = run(capsys, "evaluate", tiny_llama_dir, "--data", text_file, "--seq-len", "32", "--windows", "1",
                         "--latency", "--latency-shapes", "1x8", "--latency-reps", "1")
    assert code == 2 and "is not compressed" in err


def test_generate_cli_prints_text(capsys, tiny_ckpt, tiny_llama_dir):
    code, out, err = run(capsys, "generate", tiny_ckpt, "--prompt", "The committee met", "--max-new-tokens", "12")
    assert code == 0, err
    assert out.startswith("The committee met") and len(out.strip()) > len("The committee met")
    code, out2, err = run(capsys, "generate", tiny_ckpt, "--prompt", "The committee met", "--max-new-tokens", "12")
    assert out2 == out  # greedy is deterministic
    code, out3, err = run(capsys, "generate", tiny_llama_dir, "--prompt", "The committee met", "--max-new-tokens", "12",
                          "--sample", "--temperature", "1.5", "--top-p", "0.9", "--seed", "1")
    assert code == 0, err
    assert out3.startswith("The committee met")
    code, _, err = run(capsys, "generate", tiny_ckpt, "--prompt", "x", "--sample", "--top-p", "0")
    assert code == 2 and "--top-p" in err


# ---------------------------------------------------------------- lm-eval bridge

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def test_lm_eval_missing_is_a_clear_error(capsys, tiny_ckpt, text_file, monkeypatch):
    # runs everywhere: where lm_eval is installed, importing it is made to fail as on a machine without it
    import sys

    for mod in ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import lm_eval` now raises ImportError
    code, out, err = run(capsys, "evaluate", tiny_ckpt, "--data", text_file, "--seq-len", "32", "--windows", "1",
                         "--lm-eval", "hellaswag")
    assert code == 2 and "pip install" in err and "lm-eval" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and out == ""  # refused before any evaluation


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm_eval not installed (pip install 'ranklm[eval]')")
def test_lm_eval_local_task_offline(capsys, tiny_ckpt, tiny_llama_dir, tiny_tokenizer, text_file, tmp_path, monkeypatch):
    import re

    from conftest import TEXT, VOCAB
    from ranklm.eval.lm_eval_bridge import write_local_task

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    docs = [TEXT * 2, TEXT[100:] + TEXT, TEXT[::-1][:200] + TEXT]
    task_dir = write_local_task(docs, tmp_path / "tasks", name="ranklm_tiny_ppl")
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_words = sum(len(re.split(r"\s+", d)) for d in docs)
    n_tokens = sum(len(tiny_tokenizer(d, add_special_tokens=False).input_ids) for d in docs)
    # a randomly initialised model predicts about uniformly over its vocabulary: the chance level in bits per byte
    chance = math.log2(VOCAB) * n_tokens / n_bytes
    results = {}
    for name, model in (("compressed", tiny_ckpt), ("dense", tiny_llama_dir)):
        code, out, err = run(capsys, "evaluate", model, "--data", text_file, "--seq-len", "32", "--windows", "1",
                             "--lm-eval", "ranklm_tiny_ppl", "--lm-eval-include", task_dir, "--json")
        assert code == 0, err
        m = json.loads(out)["lm_eval"]["ranklm_tiny_ppl"]
        bpb = m["bits_per_byte"]
        assert math.isfinite(bpb) and abs(bpb / chance - 1) < 0.02, (name, bpb, chance)  # measured within 0.5 %
        # the three metrics are one log-likelihood over the same documents
        assert m["byte_perplexity"] == pytest.approx(2**bpb, rel=1e-9)
        assert math.log(m["word_perplexity"]) == pytest.approx(bpb * math.log(2) * n_bytes / n_words, rel=1e-6)
        results[name] = m
    # the compressed checkpoint is scored itself (not the dense model) and stays near the dense one
    assert results["compressed"]["bits_per_byte"] != pytest.approx(results["dense"]["bits_per_byte"], rel=1e-6)
    assert results["compressed"]["bits_per_byte"] == pytest.approx(results["dense"]["bits_per_byte"], rel=0.01)
    code, out, err = run(capsys, "evaluate", tiny_ckpt, "--data", text_file, "--seq-len", "32", "--windows", "1",
                         "--lm-eval", "no_such_task_xyz", "--lm-eval-include", task_dir)
    assert code == 2 and "unknown lm-eval task" in err
