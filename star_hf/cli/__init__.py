"""The ``star-hf`` command line. Each sub-command lives in its own module with ``add_parser``/``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> module in star_hf.cli
COMMANDS = {
    "demo": "demo",
    "upgrade": "upgrade",
    "inspect": "inspect",
    "fold": "fold",
    "push": "push",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="star-hf",
        description="STAR routing for Hugging Face MoE models: upgrade, train, inspect and share STAR routers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"{__name__}.{module_name}")
        module.add_parser(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
