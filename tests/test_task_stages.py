"""The stages of ``ranklm finetune`` on a tiny BERT: the learning-rate warm-up of every stage after
truncation (static, ARS, SoftLMs), and what ``--seed`` changes (the head's initialisation and the batch
order of every stage), docs/design.md §5 "Task fine-tuning"."""

from __future__ import annotations

import hashlib

import pytest
import torch

from test_tasks import run_json, task_file, tiny_bert_dir  # noqa: F401  (fixtures)


@pytest.fixture()
def stages(monkeypatch):
    """One record per ``run_loop`` call, in order: its description, steps and warm-up, whether the model was
    already truncated (holds ``LowRankLinear`` layers) when it started, the learning rate of every optimizer
    step and a digest of every batch it drew."""
    import ranklm.train.loop as loop
    from ranklm.layers import LowRankLinear
    from ranklm.train.objective import Objective

    out: list[dict] = []
    training_only, lr_factors, adam_step, batch = loop.training_only, loop.lr_factors, torch.optim.Adam.step, Objective.batch

    def start(model, *a, **k):  # run_loop enters it once, after the hooks swapped their layers in
        out.append({"truncated": any(isinstance(m, LowRankLinear) for m in model.modules()), "lrs": [], "batches": []})
        return training_only(model, *a, **k)

    def factors(cfg, opt):
        out[-1].update(desc=cfg.desc, steps=int(cfg.steps), warmup=int(cfg.warmup_steps), lr=cfg.lr)
        return lr_factors(cfg, opt)

    def step(self, *a, **k):
        if out:
            out[-1]["lrs"].append([g["lr"] for g in self.param_groups])
        return adam_step(self, *a, **k)

    def draw(self, *a, **k):
        b = batch(self, *a, **k)
        if out:
            h = hashlib.sha256()
            for key in sorted(b):
                h.update(b[key].contiguous().numpy().tobytes())
            out[-1]["batches"].append(h.hexdigest())
        return b

    monkeypatch.setattr(loop, "training_only", start)
    monkeypatch.setattr(loop, "lr_factors", factors)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    monkeypatch.setattr(Objective, "batch", draw)
    return out


def _run(tiny_bert_dir, task_file, allocator: str, steps: int, seed: int = 0, head_seed: int = 0):  # noqa: F811
    from ranklm.apps.finetune import TaskRunConfig, finetune_task
    from ranklm.models import load_classifier
    from ranklm.tasks import load_task

    task = load_task(task_file)
    model, tok, _ = load_classifier(str(tiny_bert_dir), task.label_names, seed=head_seed)
    cfg = TaskRunConfig(keep=0.5, allocator=allocator, steps=steps, batch_size=8, max_length=16, head_steps=2, seed=seed)
    finetune_task(model, tok, task, cfg, progress=False, evaluate=False)
    return model


@pytest.mark.parametrize("allocator", ["static", "ars", "softlm"])
def test_every_stage_after_truncation_warms_its_learning_rate_up(tiny_bert_dir, task_file, stages, allocator):  # noqa: F811
    """Fresh Adam moments on truncated factors at the full lr undid SoftLMs' keep-0.4 run (benchmarks/tasks.md):
    every stage that trains the truncated model starts from a small lr and reaches the run's lr linearly
    over ``post_truncation_warmup`` of its steps, then holds it."""
    from ranklm.apps.finetune import post_truncation_warmup

    model = _run(tiny_bert_dir, task_file, allocator, steps=40)
    after = [s for s in stages if s["truncated"]]
    assert after, [s.get("desc") for s in stages]  # the fine-tuning of the truncated model ran
    assert not any(s["truncated"] for s in stages[: stages.index(after[0])])  # head, dense, allocator stages came first
    for s in after:
        w = s["warmup"]
        assert w == post_truncation_warmup(s["steps"]) > 0, s["desc"]
        lrs = [g[0] for g in s["lrs"]]
        assert len(lrs) == s["steps"] and all(len(set(g)) == 1 for g in s["lrs"])
        assert all(a < b for a, b in zip(lrs[: w + 1], lrs[1: w + 1])), lrs[: w + 1]  # rising over the warm-up
        assert all(x < s["lr"] for x in lrs[:w]) and lrs[w:] == pytest.approx([s["lr"]] * (len(lrs) - w))
    rec = [r for r in model.ranklm.training if r["trainer"] == "finetune"]
    assert len(rec) == len(after) and all(r["options"]["warmup"] == s["warmup"] for r, s in zip(rec, after))


def test_seed_changes_the_head_initialisation(tiny_bert_dir):  # noqa: F811
    from ranklm.models import load_classifier

    heads = [load_classifier(str(tiny_bert_dir), ["neg", "pos"], seed=s)[0].classifier.weight.detach() for s in (0, 0, 1)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def test_seed_changes_the_batch_order_of_every_stage(tiny_bert_dir, task_file, stages):  # noqa: F811
    """Same initial model (head seed 0), run seeds 0 and 1: every stage (head warm-up, dense, ARS, fine-tuning)
    draws other batches."""
    _run(tiny_bert_dir, task_file, "ars", steps=12, seed=0)
    first = [(s["desc"], s["batches"]) for s in stages]
    stages.clear()
    _run(tiny_bert_dir, task_file, "ars", steps=12, seed=1)
    second = [(s["desc"], s["batches"]) for s in stages]
    assert [d for d, _ in first] == [d for d, _ in second] and len(first) == 4
    for (desc, a), (_, b) in zip(first, second):
        assert a and len(a) == len(b) and a != b, desc


def test_cli_seed_reaches_the_head_and_the_run(tmp_path, capsys, monkeypatch, tiny_bert_dir, task_file):  # noqa: F811
    """``ranklm finetune --seed`` seeds both the new head (load_classifier) and the run (TaskRunConfig.seed,
    from which every stage's batches and the pipeline's seed derive)."""
    import ranklm.apps.finetune as app
    import ranklm.models as models

    seen: dict = {}
    load = models.load_classifier

    def loader(*a, seed=0, **k):
        seen["head"] = seed
        return load(*a, seed=seed, **k)

    def fake_run(model, tok, task, cfg, **k):
        seen["run"] = cfg.seed
        return {"seed": cfg.seed}

    monkeypatch.setattr(models, "load_classifier", loader)
    monkeypatch.setattr(app, "finetune_task", fake_run)
    s = run_json(["finetune", "--task", str(task_file), "--model", str(tiny_bert_dir), "--keep", "0.5", "--seed", "7",
                  "--json"], capsys)
    assert seen == {"head": 7, "run": 7} and s["seed"] == 7
