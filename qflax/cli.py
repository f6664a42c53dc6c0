"""Command-line interface: ``python -m qflax demo``.

Unknown commands or options print the usage and exit with code 2 (argparse's convention).
"""

import argparse
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m qflax``."""
    parser = argparse.ArgumentParser(prog="python -m qflax", description="qflax command-line tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="quantize a weight matrix and print bytes and error per format")
    demo.add_argument("--rows", type=int, default=4096, help="rows of the demo matrix (default 4096)")
    demo.add_argument("--cols", type=int, default=4096, help="columns of the demo matrix (default 4096)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command named in ``argv`` (default: sys.argv[1:]) and returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from qflax.demo import run_matrix_demo

        print(run_matrix_demo(args.rows, args.cols))
    return 0
