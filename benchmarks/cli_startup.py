"""How long ``star-hf --help`` and every ``star-hf CMD --help`` take, and what they import.

Each command runs in a fresh process (``python -m star_hf``, which runs what the ``star-hf`` script
runs), ``--repeats`` times; the median wall time is reported with the min and max, and one extra run
per command records whether torch or Transformers got imported (they must not be: answering
``--help`` needs neither).

    python benchmarks/cli_startup.py            # writes benchmarks/results/cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ([], ["upgrade"], ["inspect"], ["fold"], ["push"], ["demo"])
PROBE = (
    "import json, sys, contextlib, io\n"
    "from star_hf.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    try:\n"
    "        main(sys.argv[1:] + ['--help'])\n"
    "    except SystemExit:\n"
    "        pass\n"
    "print(json.dumps({m: m in sys.modules for m in ('torch', 'transformers', 'peft', 'matplotlib')}))\n"
)


def _seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "star_hf", *argv, "--help"], check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="runs per command (the median is reported)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "cli_startup.json")
    args = parser.parse_args(argv)
    rows = []
    for command in COMMANDS:
        times = [_seconds(command) for _ in range(args.repeats)]
        probe = subprocess.run([sys.executable, "-c", PROBE, *command], check=True, capture_output=True, text=True)
        imported = json.loads(probe.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "command": " ".join(["star-hf", *command, "--help"]),
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "imports": sorted(m for m, yes in imported.items() if yes),
            }
        )
        print(
            f"{rows[-1]['command']:<28} median {rows[-1]['median_s']:.3f} s "
            f"(min {rows[-1]['min_s']:.3f}, max {rows[-1]['max_s']:.3f}); imports {rows[-1]['imports'] or 'none'}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"repeats": args.repeats, "python": sys.version.split()[0], "rows": rows}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
