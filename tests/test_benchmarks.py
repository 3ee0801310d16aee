"""The benchmark suite runs (``--quick``), writes its report, and the README quotes it.

Needs the ``test`` extra (dice-mc 0.1.1 and matplotlib, which the benchmarks import).
"""

import hashlib
import pathlib
import re
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"
COMMITTED = ROOT / "benchmarks" / "RESULTS.md"
SECTIONS = (
    "1. Estimator quality",
    "2. Overhead of a training step",
    "3. Per-example estimators",
    "4. Hessian",
    "5. Pure (keyed) sampling",
    "6. Memory saved for backward",
    "7. torch.compile",
    "8. Higher-order throughput",
)
HEADLINE = re.compile(r"<!-- headline:start -->.*?<!-- headline:end -->", re.S)


def _run(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(RUN), *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def test_quick_run_writes_every_section_and_plot(tmp_path):
    missing = []
    for module in ("dice_mc", "matplotlib", "numpy"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    assert not missing, f"install the test extra (pip install -e '.[test]'): missing {missing}"
    before = _digest(COMMITTED)
    proc = _run("--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert _digest(COMMITTED) == before  # the committed results are left alone
    text = (tmp_path / "RESULTS.md").read_text()
    assert "--quick smoke run" in text
    for title in SECTIONS:
        assert f"## {title}" in text, title
    for key in ("torch", "cpu", "threads", "date", "dice-mc"):
        assert re.search(rf"^\| {key} \| .+ \|$", text, re.M), key
    assert "0.1.1" in text
    # Every bar has a measured number and a verdict.
    table = text.split("## Every bar", 1)[1].split("![", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| item")]
    assert len(rows) >= 12
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert re.search(r"\d", cells[2]), row
        assert cells[4] in {"met", "**missed**", "reported"}, row
    for png in ("timings.png", "memory.png", "quality.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    assert HEADLINE.search(text)


def test_cuda_flag(tmp_path):
    if torch.cuda.is_available():
        proc = _run("--quick", "--device", "cuda", "--only", "sampling", "--out", str(tmp_path))
        assert proc.returncode == 0, proc.stderr[-4000:]
    else:
        proc = _run("--quick", "--device", "cuda", timeout=120)
        assert proc.returncode != 0
        assert "CUDA is not available" in proc.stderr


def test_readme_quotes_the_committed_headline():
    readme = HEADLINE.search((ROOT / "README.md").read_text())
    results = HEADLINE.search(COMMITTED.read_text())
    assert readme and results
    assert readme.group(0) == results.group(0)
