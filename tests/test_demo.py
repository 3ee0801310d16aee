import re
import subprocess
import sys
import time


def test_demo_runs_fast_and_baseline_helps():
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "dicefn"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert time.perf_counter() - start < 30
    rows = {
        (m[1].strip(), m[2]): (float(m[3]), float(m[4]))
        for m in re.finditer(r"^(none|leave-one-out|per-node \(dice-mc\))\s+(gradient|Hessian)\s+(\S+)\s+(\S+)$", out, re.M)
    }
    assert len(rows) == 6, out
    # correlation with the exact derivative, relative error
    assert rows[("leave-one-out", "Hessian")][1] < rows[("none", "Hessian")][1] / 3
    assert rows[("leave-one-out", "gradient")][1] < rows[("none", "gradient")][1] / 3
    assert rows[("leave-one-out", "Hessian")][0] > 0.99
    assert rows[("per-node (dice-mc)", "Hessian")][1] > 3 * rows[("leave-one-out", "Hessian")][1]
