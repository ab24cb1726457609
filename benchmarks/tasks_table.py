"""Markdown table of the ranklm finetune JSON outputs in benchmarks/results/tasks/ (python benchmarks/tasks_table.py)."""

import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "tasks")
rows = []
for f in sorted(root.glob("*.json")):
    lines = [x for x in f.read_text().splitlines() if x.strip().startswith("{")]
    if not lines:
        continue
    d = json.loads(lines[-1])
    if "accuracy" not in d:
        continue
    rows.append((f.stem, d))
print("| run | method | keep req. | keep (targets) | keep (whole model) | test acc. | test macro-F1 | val. acc. | steps (head; dense/alloc/ft) | train s | eval s | comebacks |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for name, d in sorted(rows, key=lambda r: (-r[1]["keep_requested"], r[0])):
    sp = d.get("steps_plan", {})
    plan = f"{d.get('head_steps', 0)}; {d['steps']} ({sp.get('dense', 0)}/{sp.get('allocator_steps', d['steps'] if d['allocator'] == 'rankdyna' else 0)}/{sp.get('finetune', 0)})"
    print(f"| {name} | {d['method']} | {d['keep_requested']:.2f} | {d['keep_achieved']:.4f} | {d['keep_achieved_model']:.4f} | "
          f"{d['accuracy']:.4f} | {d['macro_f1']:.4f} | {d['validation_accuracy']:.4f} | {plan} | {d['train_seconds']:.0f} | "
          f"{d.get('eval_seconds', 0):.0f} | {d.get('comebacks', '')} |")
