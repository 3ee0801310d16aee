"""RESULTS.md and the plots."""

from __future__ import annotations

import math
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.harness import Config, Section, md_table  # noqa: E402

HEADLINE_START = "<!-- headline:start -->"
HEADLINE_END = "<!-- headline:end -->"


def headline_block(sections: list[Section], info: dict[str, str], cfg: Config) -> str:
    rows = [list(h) for s in sections for h in s.headline]
    bars_by_item = {}
    for s in sections:
        for b in s.bars:
            if math.isfinite(b.threshold):
                bars_by_item.setdefault(s.key, []).append(b.met)
    status = []
    for s in sections:
        for _ in s.headline:
            ok = bars_by_item.get(s.key)
            status.append("met" if ok and all(ok) else ("missed" if ok else "reported"))
    table = md_table(
        ["benchmark", "measured", "bar", "status"],
        [r + [st] for r, st in zip(rows, status)],
    )
    where = (
        f"Measured on {info['cpu']}, torch {info['torch']}, {cfg.threads} intra-op thread(s), "
        f"device {cfg.device}, {info['date']} (`python benchmarks/run.py`). Timings are medians "
        "of per-round ratios of candidates interleaved in one process."
    )
    return f"{HEADLINE_START}\n{table}\n\n{where}\n{HEADLINE_END}"


def plot_timings(sections: list[Section], path: str) -> None:
    """Box plots of the per-round time ratios, with each bar's threshold."""
    series = []
    for s in sections:
        d = s.data
        if s.key == "overhead":
            series.append(("dicefn / hand\n(step)", d["ratios"]["hand"], 1.05))
            series.append(("dicefn / dice-mc\n(step)", d["ratios"]["dice-mc"], 1.02))
        elif s.key == "per_example":
            series.append(("loop / vmap\n(per-example)", d["ratio"], 20.0))
        elif s.key == "hessian":
            for v in d.values():
                thr = 1.0 if v["params"] > 100 and v["n"] == 256 else None
                series.append((f"func / autograd\n(Hessian, {v['params']} p.,\nn={v['n']})",
                               v["ratio"], thr))
        elif s.key == "sampling":
            series.append(("keyed / global\n(sampling)", d["ratio"], 5.0))
        elif s.key == "compile":
            series.append(("compiled / eager\n(step)", d["ratio"], None))
        elif s.key == "throughput":
            series.append(("loop / dicefn\n(MDP 1st-3rd)", d["ratio"], 5.0))
    if not series:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(series)), 4.5))
    ax.boxplot([v for _, v, _ in series], whis=(5, 95), showfliers=False)
    for i, (_, _, thr) in enumerate(series, start=1):
        if thr is not None:
            ax.plot([i - 0.4, i + 0.4], [thr, thr], color="tab:red", lw=2)
    ax.set_yscale("log")
    ax.set_xticks(range(1, len(series) + 1), [n for n, _, _ in series], fontsize=8)
    ax.set_ylabel("time ratio (dimensionless, log scale)")
    ax.set_title("Per-round time ratios (boxes: quartiles, whiskers: 5-95%); red: the bar")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(section: Section, path: str) -> None:
    rows = section.data["rows"]
    labels = [f"{r[2]}\n{r[0]}, {r[1]}" for r in rows]
    total = [float(r[3].replace(",", "")) / 1024 for r in rows]
    beyond = [float(r[4].replace(",", "")) / 1024 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], total, width=0.4, label="saved, total")
    ax.bar([x + 0.2 for x in xs], beyond, width=0.4, label="saved beyond the inputs")
    ax.set_xticks(list(xs), labels, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("KiB per row of logits (vocabulary 32000)")
    ax.set_title("Memory saved for backward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(
    out: str,
    sections: list[Section],
    info: dict[str, str],
    cfg: Config,
    command: str,
    total_s: float,
    extra_plots: dict[str, str],
) -> str:
    os.makedirs(out, exist_ok=True)
    plot_timings(sections, os.path.join(out, "timings.png"))
    mem = [s for s in sections if s.key == "memory"]
    if mem:
        plot_memory(mem[0], os.path.join(out, "memory.png"))
    bars = [b for s in sections for b in s.bars]
    bar_rows = [
        [b.item, b.what, b.shown,
         f"{b.op} {b.threshold:g}" if math.isfinite(b.threshold) else "—",
         ("met" if b.met else "**missed**") if math.isfinite(b.threshold) else "reported"]
        for b in bars
    ]
    gpu = (
        f"Device: {info.get('gpu', cfg.device)}."
        if cfg.device.startswith("cuda")
        else "GPU figures were **not measured**: this run used the CPU only (no CUDA device on the "
        "machine). `python benchmarks/run.py --device cuda` runs the same benchmarks on a GPU "
        "and writes `benchmarks/cuda/RESULTS.md`."
    )
    parts = [
        "# dicefn benchmarks",
        "",
        f"Generated by `{command}` in {total_s / 60:.1f} minutes"
        + (" (**--quick smoke run: small sizes and few repetitions; not for quoting**)" if cfg.quick else "")
        + ". Every timing is a ratio of candidates run side by side in one process: warmed up, "
        "then many short rounds, each measuring every candidate once in a fresh random order; "
        "the ratio is taken within each round and summarised by its median over rounds, with the "
        "interquartile range (IQR) and a distribution-free 95% confidence interval of the median. "
        "On the CPU the clock is the process's CPU time (so time spent descheduled behind other "
        "jobs on this shared machine is left out); wall-clock ratios are given alongside.",
        "",
        "## Machine",
        "",
        md_table(["", ""], [[k, v] for k, v in info.items()]),
        "",
        gpu,
        "",
        "## Headline",
        "",
        headline_block(sections, info, cfg),
        "",
        "## Every bar",
        "",
        md_table(["item", "what", "measured", "bar", "status"], bar_rows),
        "",
        "![time ratios](timings.png)",
        "",
    ]
    for s in sections:
        parts += [f"## {s.title}", "", s.body.strip(), ""]
        if s.key in extra_plots:
            parts += [f"![{s.title}]({extra_plots[s.key]})", ""]
        if s.key == "memory":
            parts += ["![memory](memory.png)", ""]
        parts += [f"_Section run time: {s.seconds:.0f} s._", ""]
    text = "\n".join(parts)
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write(text)
    return text


def update_readme(readme: str, results_text: str) -> None:
    """Copies RESULTS.md's headline block into README.md's Performance section."""
    block = re.search(
        re.escape(HEADLINE_START) + ".*?" + re.escape(HEADLINE_END), results_text, re.S
    ).group(0)
    with open(readme) as f:
        text = f.read()
    new, n = re.subn(
        re.escape(HEADLINE_START) + ".*?" + re.escape(HEADLINE_END), lambda _: block, text,
        flags=re.S,
    )
    if n != 1:
        raise SystemExit("README.md needs one headline block in its Performance section.")
    with open(readme, "w") as f:
        f.write(new)
