"""Write an offline lm-eval task (loglikelihood_rolling perplexity over a JSON-lines file) from packaged text.

    python benchmarks/lm_eval_local_task.py OUT_DIR [--source hamlet] [--docs 24] [--chars 1500]

The text is split into ``--docs`` consecutive pieces of about ``--chars`` characters (cut at a
line end), so lm-eval's rolling windows stay short on a CPU. Prints the task name; pass OUT_DIR as
``--include_path`` (lm_eval) or ``--lm-eval-include`` (ranklm evaluate). No number is computed here.
"""

from __future__ import annotations

import argparse

from ranklm.calibration import read_text_source
from ranklm.eval.lm_eval_bridge import write_local_task


def pieces(text: str, docs: int, chars: int) -> list[str]:
    out, start = [], 0
    while len(out) < docs and start < len(text):
        end = text.find("\n", start + chars)
        end = len(text) if end < 0 else end
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--source", default="hamlet")
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--chars", type=int, default=1500)
    ap.add_argument("--name", default="ranklm_hamlet_ppl")
    a = ap.parse_args()
    text = "\n".join(read_text_source(a.source).documents)
    write_local_task(pieces(text, a.docs, a.chars), a.out, name=a.name)
    print(a.name)


if __name__ == "__main__":
    main()
