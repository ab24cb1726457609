"""A new run option is one dataclass field: added to ``CompressConfig`` (in a copy of the package, no other
file touched), it is a ``compress`` and a ``bench`` option with its help and default, it is validated,
recorded in ranklm.json, readable by the pipeline from its plan, and written into bench's cell commands."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ranklm

FIELD = '''    demo_option: int = run_field(3, "--demo-option", "A demo run option added as one field.", positive=True)
'''
ANCHOR = '    base_options: dict[str, Any] = field(default_factory=dict)\n'


@pytest.fixture(scope="module")
def patched_package(tmp_path_factory) -> Path:
    """A copy of the installed ranklm source with one field added to CompressConfig, and nothing else changed."""
    root = tmp_path_factory.mktemp("patched")
    src = Path(ranklm.__file__).parent
    shutil.copytree(src, root / "ranklm", ignore=shutil.ignore_patterns("__pycache__"))
    config = root / "ranklm" / "config.py"
    text = config.read_text()
    assert text.count(ANCHOR) == 1
    config.write_text(text.replace(ANCHOR, FIELD + ANCHOR))
    return root


def _ranklm(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "ranklm", *map(str, args)], capture_output=True, text=True, env=env,
                         timeout=300)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_one_field_is_an_option_of_compress_and_bench(patched_package):
    for command in ("compress", "bench"):
        out = _ranklm(patched_package, command, "--help").stdout
        assert "--demo-option" in out and "A demo run option added as one field." in out, command
    bad = _ranklm(patched_package, "compress", "--demo-option", "0", "--no-eval", check=False)
    assert bad.returncode == 2 and "error: --demo-option must be a positive integer" in bad.stderr


def test_one_field_reaches_the_record_and_the_bench_commands(patched_package, tiny_llama_dir, text_file, tmp_path):
    ckpt = tmp_path / "ckpt"
    _ranklm(patched_package, "compress", tiny_llama_dir, "--data", text_file, "--recipe", "svd", "--keep", "0.6",
            "--seq-len", "32", "--calib-windows", "4", "--no-eval", "--demo-option", "7", "--output", ckpt)
    recorded = json.loads((ckpt / "ranklm.json").read_text())["recipe"]["config"]
    assert recorded["demo_option"] == 7
    # the recorded recipe rebuilds the config, new field included, in the patched package
    code = ("import json, sys; from ranklm.config import config_from_recipe; from ranklm.pipeline import make_plan; "
            "c = config_from_recipe(json.load(open(sys.argv[1]))['recipe']); print(make_plan(c).config.demo_option)")
    env = {**os.environ, "PYTHONPATH": str(patched_package)}
    res = subprocess.run([sys.executable, "-c", code, str(ckpt / "ranklm.json")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "7", res.stderr[-2000:]

    out = tmp_path / "bench"
    _ranklm(patched_package, "bench", tiny_llama_dir, "--data", text_file, "--recipes", "svd", "--keep", "0.6",
            "--seq-len", "32", "--eval-seq-len", "32", "--calib-windows", "4", "--eval-windows", "2", "--gen-prompts", "0",
            "--demo-option", "5", "--output", out)
    rows = json.loads((out / "results.json").read_text())["rows"]
    cell = next(r for r in rows if r["method"] == "svd")
    assert cell["status"] == "ok" and "--demo-option 5" in cell["command"]
