"""--trainer heal and the validation split (docs/design.md §13): KL zero against itself, early stopping,
resume equality, disjoint splits, heal after kfac and whiten bases, through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, outputs, random_ids

import ranklm
from ranklm.calibration.data import TextSource, corpus_splits, split_source3, token_windows
from ranklm.config import CompressConfig
from ranklm.errors import RanklmError
from ranklm.train import heal as heal_mod
from ranklm.train.logit_distill import Teacher, full_kl, kl_objective, measure, next_token_nll, teacher_top_k, top_k_kl


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_distillation_loss_is_zero_for_the_dense_model_against_itself():
    model, ids = make_model("llama"), random_ids(4, 32)
    logits = _logits(model, ids)
    cache = teacher_top_k(model, ids, k=16, batch_size=2)
    assert cache["t_logp"].shape == (4, 32, 16)
    assert abs(float(top_k_kl(logits, cache["t_logp"], cache["t_idx"]))) < 1e-6
    assert abs(float(full_kl(logits, logits))) < 1e-6
    got = measure(model, Teacher(), {"input_ids": ids, **cache}, batch_size=3)
    assert abs(got["kl"]) < 1e-6 and got["nll"] > 0
    live = measure(model, Teacher(make_model("llama")), {"input_ids": ids}, batch_size=3)
    assert abs(live["kl"]) < 1e-6
    # and it is not zero for another model: the loss sees a difference
    other = make_model("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other_logits = _logits(other, ids)
    assert float(top_k_kl(other_logits, cache["t_logp"], cache["t_idx"])) > 1e-4
    assert float(full_kl(other_logits, logits)) >= float(top_k_kl(other_logits, cache["t_logp"], cache["t_idx"])) - 1e-6


def test_lm_weight_adds_the_lm_loss_to_the_distillation_loss():
    """``lm_weight=w``: loss = KL + w x next-token NLL of the text; against itself only the NLL term is left."""
    model, ids = make_model("llama"), random_ids(2, 32)
    cache = teacher_top_k(model, ids, k=16, batch_size=2)
    batch = {"input_ids": ids, **cache}
    nll = float(next_token_nll(_logits(model, ids), ids))
    with torch.no_grad():
        assert abs(float(kl_objective(ids, Teacher(), cache, 16).loss(model, batch))) < 1e-6
        got = kl_objective(ids, Teacher(), cache, 16, lm_weight=0.5)
        assert abs(float(got.loss(model, batch)) - 0.5 * nll) < 1e-5 and "0.5 x next-token NLL" in got.description
        other = make_model("llama")
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        kl = float(top_k_kl(_logits(other, ids), cache["t_logp"], cache["t_idx"]))
        both = float(kl_objective(ids, Teacher(), cache, 16, lm_weight=2.0).loss(other, batch))
        assert abs(both - (kl + 2.0 * float(next_token_nll(_logits(other, ids), ids)))) < 1e-4
    with pytest.raises(RanklmError, match="lm_weight"):
        heal_mod.HealTrainer(lm_weight=-1.0)


def _heal(ids, val, keep=0.5, recipe="svd", **opts):
    model = make_model("llama")
    options = {"steps": 8, "lr": 1e-2, "warmup": 2, "eval_every": 2, **opts}
    cfg = CompressConfig(keep=keep, recipe=recipe, trainer="heal", trainer_options=options)
    return ranklm.compress(model, None, cfg, data=ids, progress=False, validation=val)


def test_early_stopping_stops_on_a_rising_validation_loss_and_restores_the_best(monkeypatch):
    ids, val = random_ids(8, 32), random_ids(4, 32, seed=1)
    untrained = ranklm.compress(make_model("llama"), None, CompressConfig(keep=0.5, recipe="svd"), data=ids, progress=False)
    rising = iter([1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
    monkeypatch.setattr(heal_mod, "measure", lambda *a, **k: {"nll": next(rising), "kl": 0.5})
    model = _heal(ids, val, patience=2)
    rec = model.ranklm.training[-1]
    assert rec["stopped_early"] is True and rec["steps_run"] == 4  # measured at 0, 2 (worse), 4 (worse): stop
    assert rec["validation"]["curve"]["step"] == [0.0, 2.0, 4.0] and rec["validation"]["best_step"] == 0
    assert rec["validation"]["restored_best"] is True
    # the step-0 tensors are back (balanced: the same products up to rounding); 4 steps at lr 1e-2 moved them far
    assert torch.allclose(outputs(model, ids), outputs(untrained, ids), atol=1e-5)
    rising = iter([1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
    kept = _heal(ids, val, patience=2, restore_best=False)  # without the restore the trained tensors stay
    assert not torch.allclose(outputs(kept, ids), outputs(untrained, ids), atol=1e-5)

    falling = iter([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    monkeypatch.setattr(heal_mod, "measure", lambda *a, **k: {"nll": next(falling), "kl": 0.5})
    rec = _heal(ids, val, patience=2).ranklm.training[-1]
    assert rec["stopped_early"] is False and rec["steps_run"] == 8 and rec["validation"]["best_step"] == 8


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    ids, val = random_ids(8, 32), random_ids(4, 32, seed=1)
    full = _heal(ids, val, steps=10, patience=10)
    cfg = CompressConfig(keep=0.5, recipe="svd", trainer="heal",
                         trainer_options={"steps": 10, "lr": 1e-2, "warmup": 2, "eval_every": 2, "patience": 10})
    original = heal_mod.HealHooks.loss
    calls = {"n": 0}

    def interrupted(self, model, objective, batch, step):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(self, model, objective, batch, step)

    monkeypatch.setattr(heal_mod.HealHooks, "loss", interrupted)
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        ranklm.compress(make_model("llama"), None, cfg, data=ids, progress=False, state_dir=state, save_every=2, validation=val)
    monkeypatch.setattr(heal_mod.HealHooks, "loss", original)
    resumed = ranklm.compress(make_model("llama"), None, cfg, data=ids, progress=False, state_dir=state, resume=True,
                              validation=val)
    a, b = full.ranklm.training[-1], resumed.ranklm.training[-1]
    assert b["resumed_from_step"] == 6
    assert a["history"] == b["history"] and a["validation"]["curve"] == b["validation"]["curve"]
    for (n, x), (_, y) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(x, y), n


def test_the_three_splits_are_disjoint_and_keep_the_evaluation_windows(tiny_tokenizer):
    parts = corpus_splits()
    c, e, v = (set(p.documents) for p in (parts.calibration, parts.evaluation, parts.validation))
    assert c and e and v and not (c & e) and not (c & v) and not (e & v)
    assert (len(parts.calibration.documents), len(parts.evaluation.documents), len(parts.validation.documents)) == (152, 28, 9)
    # the evaluation windows are the first windows of the former evaluation part (evaluation + validation speeches)
    before = TextSource("held out", parts.evaluation.documents + parts.validation.documents)
    n = len(token_windows(tiny_tokenizer, parts.evaluation, 512, None, purpose="evaluation"))
    assert n >= 40
    assert torch.equal(token_windows(tiny_tokenizer, parts.evaluation, 512, 40, purpose="evaluation"),
                       token_windows(tiny_tokenizer, before, 512, 40, purpose="evaluation"))
    # user text, by document: several documents, and one document cut at a blank line
    docs = [f"document {i} " * 20 for i in range(40)]
    s = split_source3(TextSource("docs", docs))
    sets = [set(p.documents) for p in (s.calibration, s.evaluation, s.validation)]
    assert all(sets) and not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(len(x) for x in sets) == 40
    one = "\n\n".join(f"paragraph {i} " * 30 for i in range(30))
    s = split_source3(TextSource("one", [one]))
    assert s.evaluation.documents[0] + "\n\n" + s.validation.documents[0] in one
    assert not set(s.validation.documents[0].split("\n\n")) & set(s.calibration.documents[0].split("\n\n"))


@pytest.mark.parametrize("recipe", ["kfac-global", "svd-llm"])
def test_heal_lowers_the_distillation_loss_after_kfac_and_whiten_bases(recipe, tmp_path):
    ids = random_ids(8, 32)
    # random tokens do not generalise: validate on windows it trains on, to see the KL fall there
    model = _heal(ids, ids[:4], keep=0.5, recipe=recipe, steps=12, patience=10, norms=True, lr=3e-4, monitor="kl")
    rec = model.ranklm.training[-1]
    assert rec["trainer"] == "heal" and model.ranklm.method.endswith("+heal")
    assert rec["teacher"]["kind"] == "top-k cache" and rec["teacher"]["memory"]["tensors_mib"] > 0
    loss = rec["history"]["loss"]
    assert sum(loss[-3:]) / 3 < loss[0]  # healing moved the compressed model toward the dense one
    curve = rec["validation"]["curve"]
    assert min(curve["kl"][1:]) < curve["kl"][0] and rec["validation"]["best"] < curve["kl"][0]
    assert rec["trained_tensors"] > sum(1 for r in model.ranklm.rank_map.values() if r != "dense") * 2
    ckpt = ranklm.save(model, None, tmp_path / "ckpt")
    meta = json.loads((ckpt / "ranklm.json").read_text())
    assert meta["training"][0]["trainer"] == "heal" and meta["training"][0]["validation"]["windows"] == 4
    loaded, _ = ranklm.load(ckpt)
    assert torch.equal(outputs(model, ids), outputs(loaded, ids))


def test_cli_heal_validates_on_the_held_out_documents(capsys, tiny_llama_dir, text_file):
    from ranklm.cli import main

    fast = ["--calib-windows", "4", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--batch-size", "2"]
    code = main(["compress", "--model", str(tiny_llama_dir), "--data", str(text_file), "--trainer", "heal",
                 "--train-opt", "steps=2", "--train-opt", "eval_every=1", "--keep", "0.5", "--json", *fast])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "validation:" in err and "validation part" in err
    assert "heal: 2 steps" in err and "validation nll" in err and "-> best" in err
    code = main(["compress", "--model", str(tiny_llama_dir), "--data", str(text_file), "--trainer", "heal",
                 "--train-opt", "monitor=loss", *fast])
    _, err = capsys.readouterr()
    assert code == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1


def test_options_are_checked():
    with pytest.raises(RanklmError, match="warmup"):
        heal_mod.HealTrainer(steps=5, warmup=-1)
    with pytest.raises(RanklmError):
        heal_mod.HealTrainer(top_k=-1)


def test_two_gloo_processes_agree(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(
        "import hashlib, json, os, sys\n"
        "import ranklm\n"
        "from conftest import make_model, random_ids\n"
        "from ranklm.config import CompressConfig\n"
        "from ranklm.train.loop import process_state\n"
        "st = process_state()\n"
        "ids, val = random_ids(8, 32), random_ids(4, 32, seed=1)\n"
        "cfg = CompressConfig(keep=0.5, recipe='svd', trainer='heal', trainer_options={'steps': 6, 'lr': 1e-2, "
        "'warmup': 2, 'eval_every': 2, 'patience': 10})\n"
        "m = ranklm.compress(make_model('llama'), None, cfg, data=ids, progress=False, validation=val)\n"
        "h = hashlib.sha256()\n"
        "for k, v in sorted(m.state_dict().items()):\n"
        "    h.update(k.encode()); h.update(v.detach().float().contiguous().numpy().tobytes())\n"
        "r = m.ranklm.training[-1]\n"
        "json.dump({'digest': h.hexdigest(), 'world_size': r['world_size'], 'history': r['history'],\n"
        "           'curve': r['validation']['curve']}, open(os.path.join(sys.argv[1], f'rank{st.process_index}.json'), 'w'))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29527", str(script),
           str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert a["world_size"] == b["world_size"] == 2
    assert a["digest"] == b["digest"] and a["history"] == b["history"] and a["curve"] == b["curve"]
    assert len(a["curve"]["step"]) == 4  # validated at 0, 2, 4, 6


def test_bench_heals_every_cell_on_the_validation_part(capsys, tiny_llama_dir, text_file, tmp_path):
    from ranklm.cli import main

    fast = ["--calib-windows", "4", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--batch-size", "2",
            "--gen-prompts", "0"]
    out = tmp_path / "bench"
    code = main(["bench", "--model", str(tiny_llama_dir), "--data", str(text_file), "--recipes", "svd,svd-llm", "--keep",
                 "0.5", "--eval-data", "default", "--eval-data", str(text_file), "--trainer", "heal", "--train-opt",
                 "steps=2", "--train-opt", "eval_every=1", "--output", str(out), "--save-dir", str(tmp_path / "cells"),
                 *fast])
    _, err = capsys.readouterr()
    assert code == 0, err
    records = {p.parent.name: json.loads(p.read_text())["training"][0] for p in (tmp_path / "cells").rglob("ranklm.json")}
    assert len(records) == 2
    for rec in records.values():
        assert rec["trainer"] == "heal" and rec["validation"]["windows"] >= 1 and len(rec["validation"]["curve"]["step"]) == 3
    # the cells share one teacher cache: the dense model and the windows are the same for every cell
    assert sorted(rec["teacher"]["shared"] for rec in records.values()) == [False, True]
    # each cell is measured before its trainer too, on every evaluation text, from the same allocation
    rows = json.loads((out / "results.json").read_text())["rows"]
    cells = [r for r in rows if r["method"] != "dense"]
    label = json.loads((out / "results.json").read_text())["meta"]["eval_labels"][1]
    for r in cells:
        assert r["status"] == "ok" and r["ppl_untrained"] > 0 and r[f"ppl_{label}_untrained"] > 0
        assert r["ppl_untrained"] != r["ppl"]  # two steps of training moved it
    assert "before training" in (out / "results.md").read_text()
    assert "ppl_untrained" in (out / "results.csv").read_text().splitlines()[0]


def test_loop_schedules_warm_up_then_decay_and_task_runs_warm_up_after_truncation():
    from ranklm.apps.finetune import TaskRunConfig, plan_steps, post_truncation_warmup
    from ranklm.train.loop import LoopConfig, lr_factors

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cos = lr_factors(LoopConfig(steps=20, lr=1.0, warmup_steps=5, lr_schedule="cosine"), opt)
    assert cos(0) == 0.0 and cos(5) == pytest.approx(1.0) and cos(19) < 0.05 and cos(2) < cos(4)
    const = lr_factors(LoopConfig(steps=20, lr=1.0, warmup_steps=4, lr_schedule="constant"), opt)
    assert const(1) == pytest.approx(0.25) and const(4) == const(19) == 1.0
    old = lr_factors(LoopConfig(steps=20, lr=1.0, lr_schedule="cosine"), opt)  # without warm-up: the loop's own formula
    assert old(0) == 1.0 and old(10) == pytest.approx(0.5)
    assert opt.param_groups[0]["lr"] == 1.0  # building a schedule leaves the optimizer's lr alone
    steps = plan_steps(TaskRunConfig(keep=0.4, allocator="softlm", steps=200))["finetune"]
    assert steps == 50 and post_truncation_warmup(steps) == 10 and post_truncation_warmup(0) == 0


def test_cli_data_splits_keep_calibration_unless_a_run_validates(tmp_path):
    from ranklm.cli.common import data_splits, eval_sources

    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"document {i} " * 10}) for i in range(30)) + "\n")
    calib, evald, val = data_splits(str(f), None)
    assert len(calib.documents) == 27 and len(evald.documents) == 2 and len(val.documents) == 1
    assert eval_sources(str(f), None)[1].documents == evald.documents  # compress and bench evaluate on the same part
    calib, evald, val = data_splits(str(f), "hamlet")  # a separate evaluation text: all of --data calibrates
    assert len(calib.documents) == 30 and val is None and evald.description.startswith("Hamlet")
    calib, evald, val = data_splits(str(f), "hamlet", validate=True)  # ... unless the run validates
    assert len(calib.documents) == 27 and len(val.documents) == 3 and not set(calib.documents) & set(val.documents)
    one = tmp_path / "one.txt"
    one.write_text("no blank line here " * 200)
    assert data_splits(str(one), None)[2] is None  # nothing to validate on: the held-out tail stays whole
    with pytest.raises(RanklmError, match="no validation part"):
        data_splits(str(one), None, validate=True)


def test_seeded_extension_keeps_the_calibration_windows_first_and_skips_the_held_out_ones():
    from ranklm.calibration.data import seeded_extension, seeded_split

    windows = torch.arange(40 * 3).reshape(40, 3)
    calib, held = seeded_split(windows, 8, seed=5, holdout=6)
    out = seeded_extension(windows, 8, 20, seed=5, skip=6)
    assert len(out) == 20 and torch.equal(out[:8], calib)  # the statistics' windows, unchanged, first
    rows = {tuple(r.tolist()) for r in out}
    assert len(rows) == 20 and not rows & {tuple(r.tolist()) for r in held}  # none of --auto's held-out windows
    assert torch.equal(out[8:], out[8:][out[8:, 0].argsort()])  # the extra windows in stream order
    assert torch.equal(seeded_extension(windows, 8, 20, seed=5, skip=6), out)  # seeded: the same every time
    assert len(seeded_extension(windows, 8, 100, seed=5)) == 40  # a short text gives all it has
    assert torch.equal(seeded_extension(windows, 8, 8, seed=5), calib)


def test_heal_trains_on_more_calibration_windows_when_asked(capsys, tiny_llama_dir, text_file, tmp_path, caplog):
    """``windows=N``: compress, bench and the Python API cut N windows of the calibration text (the calibration
    windows first); token ids given by the caller have no more text, so heal says so and uses the windows it has."""
    import logging

    from ranklm.cli import main
    from ranklm.models import load_model

    fast = ["--calib-windows", "4", "--seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--batch-size", "2"]
    heal = ["--trainer", "heal", "--train-opt", "steps=2", "--train-opt", "eval_every=1", "--train-opt", "windows=10"]
    out = tmp_path / "ckpt"
    code = main(["compress", "--model", str(tiny_llama_dir), "--data", str(text_file), "--keep", "0.5", "--output",
                 str(out), "--no-eval", *heal, *fast])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "heal trains on 10 windows x 32 tokens: the 4 calibration windows and 6 more" in err
    rec = json.loads((out / "ranklm.json").read_text())["training"][0]
    assert rec["train_windows"] == {"windows": 10, "seq_len": 32, "calibration_windows": 4}
    code = main(["bench", "--model", str(tiny_llama_dir), "--data", str(text_file), "--recipes", "svd", "--keep", "0.5",
                 "--output", str(tmp_path / "bench"), "--save-dir", str(tmp_path / "cells"), "--gen-prompts", "0",
                 *heal, *fast])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(next((tmp_path / "cells").rglob("ranklm.json")).read_text())["training"][0]["train_windows"][
        "windows"] == 10
    model, tok, _ = load_model(str(tiny_llama_dir))
    cfg = CompressConfig(keep=0.5, recipe="svd", calib_windows=4, seq_len=32, batch_size=2, trainer="heal",
                         trainer_options={"steps": 1, "windows": 10})
    text = text_file.read_text().split("\n\n")
    m = ranklm.compress(model, tok, cfg, data=text, progress=False)
    assert m.ranklm.training[-1]["train_windows"]["windows"] == 10
    ids = random_ids(4, 32)
    with caplog.at_level(logging.INFO, logger="ranklm.train.heal"):
        m = ranklm.compress(make_model("llama"), None, cfg, data=ids, progress=False)
    assert m.ranklm.training[-1]["train_windows"]["windows"] == 4 and "windows=10 asked for" in caplog.text


def test_dense_targets_train_the_matrices_the_budget_kept_dense():
    """``dense_targets=true``: the targets kept dense train beside the factors (at high keep the factors are a small
    part of the model); off by default, where those weights stay exactly as they were."""
    ids, val = random_ids(8, 32), random_ids(4, 32, seed=1)

    def run(**opts):
        model = make_model("llama")
        dense0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        healed = _heal(ids, val, keep=0.8, recipe="kfac-global", steps=3, restore_best=False, **opts)
        dense = [n for n, r in healed.ranklm.rank_map.items() if r == "dense"]
        assert dense, "keep 0.8 should leave some targets dense on the tiny model"
        moved = [n for n in dense if not torch.equal(healed.get_submodule(n).weight, dense0[n])]
        return healed.ranklm.training[-1], dense, moved

    rec, dense, moved = run()
    assert rec["dense_targets_trained"] == 0 and moved == []
    rec, dense, moved = run(dense_targets=True)
    assert rec["dense_targets_trained"] == len(dense) and sorted(moved) == sorted(dense)
