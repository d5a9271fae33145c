"""``python -m benchmarks [options]``: the comparison suite of benchmarks/harness.py, with the
JSON written to benchmarks/results/<device>-<suite|scaling>[-quick].json unless ``--json``
says otherwise.  ``python -m benchmarks --help`` lists the options; benchmarks/README.md
records the machine, the command and the results.  The harness is not part of the installed
package: run it from a checkout's root."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from xpconv.cli import positive_int

from . import machine
from .harness import (
    EPOCH_SAMPLES,
    EPOCHS,
    IMPLS,
    MODELS,
    SCALING_BATCHES,
    SUITE_BATCHES,
    check_targets,
    format_table,
    run_epochs,
    run_suite,
    write_json,
)

PROG = "python -m benchmarks"
RESULTS = Path(__file__).resolve().parent / "results"


def _csv(kind):
    def parse(text):
        items = [v.strip() for v in text.replace(",", " ").split() if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [kind(v) for v in items]

    return parse


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Training-step and inference throughput of SimpleConvNet/DeepConvNet: "
        "xpconv, PyTorch and a textbook NumPy baseline side by side.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: xpconv on NumPy vs torch CPU vs textbook; cuda: xpconv on CuPy vs torch CUDA")
    p.add_argument("--models", type=_csv(str), default=list(MODELS), help="comma-separated: simple,deep (default both)")
    p.add_argument("--batch-sizes", type=_csv(positive_int), default=None,
                   help=f"comma-separated (default {','.join(map(str, SUITE_BATCHES))}; with --scaling "
                   f"{','.join(map(str, SCALING_BATCHES))})")
    p.add_argument("--impls", type=_csv(str), default=None,
                   help="comma-separated subset of xpconv,torch,textbook (default all; with --scaling xpconv,torch)")
    p.add_argument("--modes", type=_csv(str), default=["train", "infer"], help="train,infer (default both)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per cell; the median is reported (default 5)")
    p.add_argument("--min-time", type=float, default=None, help="seconds per repeat at least (default 0.5)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="BLAS threads for NumPy and intra-op threads for torch (default: the libraries' own)")
    p.add_argument("--scaling", action="store_true", help="throughput and peak memory against batch size 1, 10, 100, 1000")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: 2 repeats of >= 0.02 s (numbers are rough)")
    p.add_argument("--epochs-run", type=int, nargs="?", const=EPOCHS, default=None, metavar="E",
                   help=f"also time a whole Trainer run of SimpleConvNet: E epochs (default {EPOCHS}) over "
                   f"--epoch-samples synthetic samples, batch 100, Adam")
    p.add_argument("--epoch-samples", type=positive_int, default=EPOCH_SAMPLES, help=f"samples per epoch of --epochs-run (default {EPOCH_SAMPLES:,})")
    p.add_argument("--json", metavar="PATH", default=None, help="write every number as JSON to PATH")
    return p


def run(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Parse the options, run the suite, print the table and write ``--json`` if given."""
    args = build_parser(prog).parse_args(argv)
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        print(f"{prog}: unknown model(s) {bad}; expected some of {', '.join(MODELS)}", file=sys.stderr)
        return 2
    impls = args.impls or (["xpconv", "torch"] if args.scaling else list(IMPLS))
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        print(f"{prog}: unknown implementation(s) {bad}; expected some of {', '.join(IMPLS)}", file=sys.stderr)
        return 2
    bad = [m for m in args.modes if m not in ("train", "infer")]
    if bad:
        print(f"{prog}: unknown mode(s) {bad}; expected train and/or infer", file=sys.stderr)
        return 2
    batches = args.batch_sizes or list(SCALING_BATCHES if args.scaling else SUITE_BATCHES)
    repeats = args.repeats or (2 if args.quick else 5)
    min_time = args.min_time if args.min_time is not None else (0.02 if args.quick else 0.5)
    if min_time < 0:
        print(f"{prog}: --min-time must be >= 0, got {min_time}", file=sys.stderr)
        return 2

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        result = run_suite(device=args.device, models=args.models, batch_sizes=batches, impls=impls,
                           repeats=repeats, min_time=min_time, threads=args.threads, modes=args.modes,
                           scaling=args.scaling, log=log)
    except RuntimeError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.epochs_run:
        with machine.thread_limit(args.threads):
            result["epochs_run"] = run_epochs(args.epochs_run, args.epoch_samples, test_samples=min(10_000, args.epoch_samples),
                                              device=args.device, log=log)
        if "targets" in result:
            result["targets"] = check_targets(result)
    result["command"] = " ".join([prog] + list(sys.argv[1:] if argv is None else argv))
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"\nwrote {args.json}")
    return 0



def main(argv: Sequence[str] | None = None) -> int:
    """:func:`run`, with ``--json benchmarks/results/<device>-<kind>.json`` when no ``--json`` is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" not in argv and "--help" not in argv and not any(a == "--json" or a.startswith("--json=") for a in argv):
        args = build_parser().parse_args(argv)
        name = f"{args.device}-{'scaling' if args.scaling else 'suite'}{'-quick' if args.quick else ''}.json"
        argv += ["--json", str(RESULTS / name)]
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
