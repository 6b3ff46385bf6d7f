"""The `fastalign` command: bench, compile-check, demo."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time fastalign against eager PyTorch and the installed peers")
    bench.add_argument("--json", metavar="PATH", help="write the records as JSON here")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG of the results here")
    bench.add_argument("--size", choices=["small", "target"], help="default: target on a GPU, small on a CPU")
    bench.add_argument("--only", metavar="OP", action="append", help="run only these ops (repeatable)")

    check = sub.add_parser("compile-check", help="compile every kernel for sm_80 and sm_90 without a GPU")
    check.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")

    demo = sub.add_parser("demo", help="IFT then DPO + OnDARE on a tiny Llama, with progress, summary and a plot")
    demo.add_argument("--plot", metavar="PATH", default="fastalign-demo.png", help="PNG of the training curves")
    demo.add_argument("--size", choices=["small", "large"], help="default: large on a GPU, small on a CPU")

    args = parser.parse_args(argv)
    if args.command == "compile-check":
        from fastalign import compile_check

        return compile_check.run(tuple(args.arch) if args.arch else compile_check.ARCHS)
    if args.command == "bench":
        from fastalign import bench

        return bench.main(json_path=args.json, plot_path=args.plot, size=args.size, only=args.only)
    if args.command == "demo":
        from fastalign import demo

        return demo.main(plot_path=args.plot, size=args.size)
    return 2


if __name__ == "__main__":
    sys.exit(main())
