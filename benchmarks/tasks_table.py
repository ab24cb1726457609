"""Markdown tables of the ranklm finetune JSON outputs in benchmarks/results/tasks/ (python benchmarks/tasks_table.py [DIR]).

``tasks_run.sh`` writes one ``--json`` output per run and seed, ``<run>-s<seed>.json``. The first table gives each run's
mean +- sample standard deviation over its seeds (the seeds listed; a run with one seed shows its value alone); the
second keeps every seed's row. A file without the ``-s<seed>`` suffix (written before seeds were added) counts as the
seed its JSON records, unless a suffixed file for that run and seed exists.
"""

import json
import re
import statistics
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "tasks")
runs: dict[str, dict[int, tuple[str, dict]]] = {}
for f in sorted(root.glob("*.json")):
    lines = [x for x in f.read_text().splitlines() if x.strip().startswith("{")]
    if not lines:
        continue
    d = json.loads(lines[-1])
    if "accuracy" not in d:
        continue
    m = re.fullmatch(r"(.+)-s(\d+)", f.stem)
    run, seed = (m.group(1), int(m.group(2))) if m else (f.stem, int(d.get("seed", 0)))
    if m and int(d.get("seed", seed)) != seed:
        sys.exit(f"{f}: the name says seed {seed}, the JSON says {d.get('seed')}")
    if seed in runs.get(run, {}) and not m:
        continue  # a suffixed file for this run and seed wins over an unsuffixed one
    runs.setdefault(run, {})[seed] = (f.stem, d)


def plan(d: dict) -> str:
    sp = d.get("steps_plan", {})
    alloc = sp.get("allocator_steps", d["steps"] if d["allocator"] == "rankdyna" else 0)
    return f"{d.get('head_steps', 0)}; {d['steps']} ({sp.get('dense', 0)}/{alloc}/{sp.get('finetune', 0)})"


def mean_std(xs: list[float], digits: int = 4) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def order(item: tuple[str, dict]) -> tuple:
    d = next(iter(item[1].values()))[1]
    return (-d["keep_requested"], item[0])


print("Mean ± standard deviation over seeds (sample std, n - 1).\n")
print("| run | method | seeds | keep req. | keep (targets) | keep (whole model) | test acc. | test macro-F1 | val. acc. "
      "| steps (head; dense/alloc/ft) | train s (mean) | comebacks (mean) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for run, by_seed in sorted(runs.items(), key=order):
    ds = [by_seed[s][1] for s in sorted(by_seed)]
    d0 = ds[0]
    comebacks = [d["comebacks"] for d in ds if d.get("comebacks") is not None]
    print(f"| {run} | {d0['method']} | {', '.join(map(str, sorted(by_seed)))} | {d0['keep_requested']:.2f} | "
          f"{mean_std([d['keep_achieved'] for d in ds])} | {mean_std([d['keep_achieved_model'] for d in ds])} | "
          f"{mean_std([d['accuracy'] for d in ds])} | {mean_std([d['macro_f1'] for d in ds])} | "
          f"{mean_std([d['validation_accuracy'] for d in ds])} | {plan(d0)} | "
          f"{statistics.mean(d['train_seconds'] for d in ds):.0f} | "
          f"{f'{statistics.mean(comebacks):.0f}' if comebacks else ''} |")

print("\nEvery seed.\n")
print("| run | seed | method | keep req. | keep (targets) | keep (whole model) | test acc. | test macro-F1 | val. acc. "
      "| steps (head; dense/alloc/ft) | train s | eval s | comebacks |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for run, by_seed in sorted(runs.items(), key=order):
    for seed in sorted(by_seed):
        name, d = by_seed[seed]
        print(f"| {name} | {seed} | {d['method']} | {d['keep_requested']:.2f} | {d['keep_achieved']:.4f} | "
              f"{d['keep_achieved_model']:.4f} | {d['accuracy']:.4f} | {d['macro_f1']:.4f} | {d['validation_accuracy']:.4f} | "
              f"{plan(d)} | {d['train_seconds']:.0f} | {d.get('eval_seconds', 0):.0f} | {d.get('comebacks', '')} |")
