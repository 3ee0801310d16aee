"""The notebooks: committed executed from their sources, and they run top to bottom.

Each notebook under ``notebooks/`` is built from ``notebooks/src/<name>.py`` by
``notebooks/build.py`` and committed with its outputs. These tests check that the committed
code is the source's, that it was executed (outputs, figures, no errors, modest size), and
execute every notebook again in a fresh kernel, failing on any cell error. A cell appended
at the end prints the notebook's ``headline`` dict as JSON, and a few cheap checks on it
make sure the numbers still tell the notebook's story.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the [test] extra")
pytest.importorskip("nbclient", reason="notebook tests need the [test] extra")
pytest.importorskip("matplotlib", reason="notebook tests need the [test] extra")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
# notebooks/build.py, under a name that cannot collide with an installed "build" package.
_spec = importlib.util.spec_from_file_location("dicefn_notebooks_build", NOTEBOOKS / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

AVAILABLE = [n for n in build.NAMES if (NOTEBOOKS / "src" / f"{n}.py").exists()]
MAX_BYTES = 2_000_000


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


@pytest.mark.parametrize("name", AVAILABLE)
def test_committed_notebook_is_its_executed_source(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes"
    nb = nbformat.read(path, as_version=4)
    cells = [(c.cell_type, c.source) for c in nb.cells]
    assert cells == build.parse((NOTEBOOKS / "src" / f"{name}.py").read_text()), (
        f"{path.name} differs from notebooks/src/{name}.py: run python notebooks/build.py {name}"
    )
    assert nb.cells[0].cell_type == "markdown", "a notebook opens with what it shows and why"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "committed without executing every cell"
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure"
    last = "".join(o.get("text", "") for o in code[-1].outputs if o.output_type == "stream")
    assert "What we saw" in last


def _close(a, b, factor):
    return b / factor <= a <= b * factor


def check_hessian(h):
    assert h["max_abs_diff_hessian_vs_jacfwd_jacrev"] < 1e-10
    err = h["hessian_rel_error_at_8192"]
    none, per_node, any_order = err.values()
    assert any_order < none / 4 and any_order < per_node / 4
    assert all(-0.7 < s < -0.3 for s in h["hessian_loglog_slope"].values())


def check_per_example(h):
    assert h["max_abs_diff_vmap_vs_loop"] < 1e-3
    assert _close(h["observed_batch_variance"], h["predicted_batch_variance"], 2.0)
    mse = h["mse_at_1024"]
    assert mse["per-item + leave-one-out"] < mse["per-item costs"] < mse["one summed cost"] / 100


def check_lola_dice(h):
    final = h["final_joint_return"]
    assert final["naive learners"] < -1.9
    assert final["2 steps, surrogate without magic box"] < -1.9
    assert max(final["LOLA-DiCE, 2 steps"], final["LOLA-DiCE, 3 steps"]) > -1.5
    assert h["exact_gradient_final_joint_return"]["LOLA-DiCE, 3 steps"] > -1.3
    assert h["gradient_correlation_1024_loo"] > 0.95
    assert h["hessian_correlation_1024_loo"] > 0.8


def check_maml(h):
    after, before = h["test_return_after"], h["test_return_before"]
    assert after["DiCE"] > after["first-order surrogate"]
    assert after["DiCE"] > before["no adaptation"] + 2.0
    assert after["DiCE"] > before["DiCE"] + 2.0


def check_loaded_dice(h):
    c = h["correlation_4096"]
    assert c["Loaded DiCE"][1] > 0.9 and c["any-order baseline"][1] > 0.7
    assert c["Loaded DiCE"][2] > c["LVC"][2]
    assert c["DiCE, no baseline"][1] < 0.5
    assert h["mean_abs_gap_to_published"] < 0.2
    (b0, b1), (s0, s1) = h["order2_bias_lambda0_to_1"], h["order2_std_lambda0_to_1"]
    assert b0 > 2 * b1 and s1 > 5 * s0


def check_lm_finetune(h):
    assert h["max_grad_diff_vs_rloo_surrogate"] < 1e-5
    reward, kl = h["eval_reward"], h["eval_kl_nats"]
    leashed = f"kl_coef {h['kl_coef']:g}"
    assert reward["kl_coef 0"] > 0.9 > reward["pre-trained"] + 0.2
    assert reward[leashed] > reward["pre-trained"]
    assert kl[leashed] < kl["kl_coef 0"] / 3


CHECKS = {name: globals().get(f"check_{name}") for name in build.NAMES}
# Fewer LOLA-DiCE seeds in the test suite (the notebook reads this; its setup is unchanged).
TEST_ENV = {"DICEFN_NOTEBOOK_SEEDS": "2"}


@pytest.mark.parametrize("name", AVAILABLE)
def test_notebook_runs_top_to_bottom(name, monkeypatch):
    for k, v in TEST_ENV.items():
        monkeypatch.setenv(k, v)
    nb = build.make_notebook(name)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json as _json\nprint('HEADLINE ' + _json.dumps(headline, default=float))"
    ))
    build.execute(nb)  # raises CellExecutionError on the first failing cell
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    headline = json.loads(text.split("HEADLINE ", 1)[1])
    check = CHECKS.get(name)
    assert check is not None, f"no headline check for {name}"
    check(headline)


def test_readme_numbers_are_the_notebooks():
    """Every measured number quoted in the README's Notebooks section is in that notebook's output."""
    readme = (NOTEBOOKS.parent / "README.md").read_text()
    section = readme.split("## Notebooks", 1)[1].split("\n## ", 1)[0]
    bullets = re.findall(r"^- \[`(\w+)\.ipynb`\].*?(?=^- |\Z)", section, re.S | re.M)
    assert sorted(bullets) == sorted(build.NAMES), bullets
    for bullet in re.split(r"^- ", section, flags=re.M)[1:]:
        name = re.match(r"\[`(\w+)\.ipynb`\]", bullet).group(1)
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        text = "".join(o.get("text", "") for o in _outputs(nb) if o.output_type == "stream")
        quoted = re.findall(r"-?\d+\.\d+(?:e[+-]\d+)?x?|\b\d+x\b", bullet)
        assert quoted, name
        missing = [q for q in quoted if q not in text]
        assert not missing, f"README quotes {missing} for {name}.ipynb, not in its outputs"
