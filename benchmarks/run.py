"""Runs every dicefn benchmark and writes RESULTS.md plus plots.

    python benchmarks/run.py                  # full run: benchmarks/RESULTS.md (CPU)
    python benchmarks/run.py --quick --out D  # smoke run (< 2 minutes), written to D
    python benchmarks/run.py --device cuda    # GPU run: benchmarks/cuda/RESULTS.md

Needs the ``benchmarks`` extra (``pip install -e ".[benchmarks]"``: matplotlib, numpy and
dice-mc 0.1.1, which is run in the same process for side-by-side numbers).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ITEMS = ("quality", "overhead", "per_example", "hessian", "sampling", "memory", "compile",
         "throughput")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small sizes and few repetitions (< 2 minutes)")
    p.add_argument("--out", help="output directory (default: benchmarks/ for a full CPU run, "
                   "benchmarks/cuda/ on CUDA, a new temporary directory with --quick)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for every benchmark (default 1)")
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(ITEMS))
    p.add_argument("--update-readme", action="store_true",
                   help="copy the headline table into README.md's Performance section")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {args.device}: CUDA is not available in this torch build/machine "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). Run without "
            "--device for the CPU benchmarks."
        )
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise SystemExit(f"--device must be cpu or cuda[:N], got {args.device!r}.")
    if args.update_readme and (args.quick or args.only or args.device != "cpu"):
        raise SystemExit("--update-readme takes the headline of a full CPU run only.")
    items = ITEMS if not args.only else tuple(args.only.split(","))
    unknown = [i for i in items if i not in ITEMS]
    if unknown:
        raise SystemExit(f"--only: unknown items {unknown}; choose from {', '.join(ITEMS)}.")
    if args.out:
        out = args.out
    elif args.quick:
        out = tempfile.mkdtemp(prefix="dicefn-bench-")
    else:
        out = os.path.join(ROOT, "benchmarks", "cuda" if args.device.startswith("cuda") else "")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)

    torch.set_num_threads(args.threads)
    from benchmarks import harness, report

    cfg = harness.Config(quick=args.quick, device=args.device, threads=args.threads)
    info = harness.machine(cfg)
    start = time.perf_counter()
    sections = []
    extra_plots: dict[str, str] = {}
    for item in items:
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - start:6.1f}s] {item} ...", flush=True)
        section = run_item(item, cfg, out, extra_plots)
        section.seconds = time.perf_counter() - t0
        sections.append(section)
        for b in section.bars:
            verdict = (f"bar {b.op} {b.threshold:g}: {'met' if b.met else 'MISSED'}"
                       if math.isfinite(b.threshold) else "reported")
            print(f"    {b.what}: {b.shown} ({verdict})", flush=True)
    total = time.perf_counter() - start
    command = "python benchmarks/run.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a != "--update-readme"
    )
    text = report.write(out, sections, info, cfg, command.strip(), total, extra_plots)
    if args.update_readme:
        report.update_readme(os.path.join(ROOT, "README.md"), text)
    print(f"wrote {os.path.join(out, 'RESULTS.md')} in {total:.0f} s")
    return 0


def run_item(item: str, cfg, out: str, extra_plots: dict[str, str]):
    from benchmarks import speed

    if item == "overhead":
        return speed.overhead(cfg)
    if item == "per_example":
        return speed.per_example(cfg)
    if item == "hessian":
        return speed.hessian_bench(cfg)
    if item == "sampling":
        return speed.sampling(cfg)
    if item == "memory":
        return speed.memory(cfg)
    if item == "compile":
        return speed.compile_step(cfg)
    from benchmarks import mdp_bench

    if item == "quality":
        section = mdp_bench.quality(cfg)
        path = os.path.join(out, "quality.png")
        mdp_bench.plot_quality(section, path)
        extra_plots[section.key] = "quality.png"
        return section
    if item == "throughput":
        return mdp_bench.throughput(cfg)
    raise ValueError(item)


if __name__ == "__main__":
    sys.exit(main())
