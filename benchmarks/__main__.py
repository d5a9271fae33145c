"""``python -m benchmarks [xpconv bench options]``: the suite of xpconv.bench, with the
JSON written to benchmarks/results/<device>-<suite|scaling>.json by default."""

from __future__ import annotations

import sys
from pathlib import Path

from xpconv import bench

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" not in argv and "--help" not in argv and not any(a == "--json" or a.startswith("--json=") for a in argv):
        args = bench.build_parser().parse_args(argv)
        name = f"{args.device}-{'scaling' if args.scaling else 'suite'}{'-quick' if args.quick else ''}.json"
        argv += ["--json", str(RESULTS / name)]
    return bench.main(argv, prog="python -m benchmarks")


if __name__ == "__main__":
    sys.exit(main())
