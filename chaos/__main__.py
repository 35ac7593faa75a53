"""``python -m chaos``: run the soak's trials and print its table.

python -m chaos                    # the full soak: seeds 1-20 (make chaos)
python -m chaos --seeds 7          # replay one trial
python -m chaos --seeds 1-4,9      # some trials
python -m chaos --quick --seeds 1  # the short trial of make test
python -m chaos --report out1 out2 # one table of the trials run under these --out folders
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chaos.report import load_results, table
from chaos.settings import Sizes, say
from chaos.soak import run_soak

#: the soak's trials
SEEDS = tuple(range(1, 21))


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=parse_seeds, default=list(SEEDS), help="e.g. 1-20 or 3,7")
    parser.add_argument("--quick", action="store_true", help="small trials (as in make test)")
    parser.add_argument(
        "--full-load", action="store_true", help="8 workers x 25 runs a trial (~8 min each)"
    )
    parser.add_argument("--out", type=Path, default=Path("chaos-out"), help="trial data folder")
    parser.add_argument("--keep-all", action="store_true", help="keep passing trials' data too")
    parser.add_argument("--table", type=Path, help="also write the table to this file")
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        help="only print the table of the trials run under these --out folders",
    )
    args = parser.parse_args(argv)
    if args.report:
        kept = load_results(*args.report)
        say(table(kept, sum(r.seconds for r in kept)))
        return 0 if all(r.passed for r in kept) else 1
    sizes = Sizes.quick() if args.quick else Sizes.full_load() if args.full_load else Sizes()
    results, seconds = run_soak(args.seeds, args.out, sizes, keep_all=args.keep_all)
    text = table(results, seconds)
    say()
    say(text)
    if args.table:
        args.table.write_text(text + "\n")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
