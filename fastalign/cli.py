"""The `fastalign` command: bench, compile-check, gpu-check, report, demo."""

from __future__ import annotations

import argparse
import sys

from fastalign.bench import OPS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time fastalign against eager PyTorch and the installed peers")
    bench.add_argument("--json", metavar="PATH", help="write the records as JSON here")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG of the results here")
    bench.add_argument("--size", choices=["small", "target"], help="default: target on a GPU, small on a CPU")
    bench.add_argument(
        "--only", metavar="OP", action="append", choices=OPS, help=f"run only this op (repeatable): {', '.join(OPS)}"
    )

    check = sub.add_parser(
        "compile-check", help="compile what launches for sm_80/sm_90 without a GPU, read its SASS, predict its speed"
    )
    check.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    check.add_argument("--only", metavar="TEXT", help="only the cases whose label or module contains TEXT")
    check.add_argument("--jobs", type=int, help="compile processes (default: one per CPU)")

    gpu = sub.add_parser("gpu-check", help="on a GPU machine: compiled tests, target-size benchmarks, results JSON")
    gpu.add_argument("--budget", type=float, default=300, metavar="SECONDS", help="no case starts after this (300)")
    gpu.add_argument("--rehearse", action="store_true", help="the same steps on the CPU (Triton interpreter)")
    gpu.add_argument(
        "--out",
        metavar="PATH",
        help="results JSON, or a folder (made if missing) for <gpu>-<date>.json and pytest's log (default: "
        "benches/results; with --rehearse, a scratch folder)",
    )

    report = sub.add_parser("report", help="README's Performance table from the results files in benches/results")
    report.add_argument("--write", action="store_true", help="rewrite the table in README.md instead of printing it")

    demo = sub.add_parser("demo", help="IFT then DPO + OnDARE on a tiny Llama, with progress, summary and a plot")
    demo.add_argument("--plot", metavar="PATH", default="fastalign-demo.png", help="PNG of the training curves")
    demo.add_argument("--size", choices=["small", "large"], help="default: large on a GPU, small on a CPU")

    args = parser.parse_args(argv)
    if args.command == "compile-check":
        from fastalign import compile_check

        archs = tuple(args.arch) if args.arch else compile_check.ARCHS
        return compile_check.run(archs, only=args.only, jobs=args.jobs)
    if args.command == "bench":
        from fastalign import bench

        return bench.main(json_path=args.json, plot_path=args.plot, size=args.size, only=args.only)
    if args.command == "gpu-check":
        from fastalign import gpu_check

        return gpu_check.main(budget=args.budget, rehearse=args.rehearse, out=args.out)
    if args.command == "report":
        from fastalign.bench import report

        return report.main(write=args.write)
    if args.command == "demo":
        from fastalign import demo

        return demo.main(plot_path=args.plot, size=args.size)
    return 2


if __name__ == "__main__":
    sys.exit(main())
