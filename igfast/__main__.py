"""`python -m igfast`: the demo (a later release grows this into the igfast command)."""

import argparse
import sys

from .demo import run_demo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m igfast", description="igfast demo: attribute built-in models, side by side with Captum.")
    parser.add_argument("command", nargs="?", default="demo", choices=["demo"], help="what to run (default: demo)")
    parser.add_argument("--n-steps", type=int, default=50, help="quadrature nodes (default 50)")
    args = parser.parse_args(argv)
    if args.n_steps < 1:
        parser.error("--n-steps must be >= 1")
    run_demo(n_steps=args.n_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
