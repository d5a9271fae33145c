"""Write tests/data/book_golden.npz: the book's outputs for every conformance case
(tests/test_book_conformance.py), its constructors' signatures and its public names,
computed by the book's own code in ../shared/reference/deep-learning-from-scratch.

    python -m tests.make_book_golden

The conformance suite reads the file where the book's code is not beside the checkout,
and checks it against the live code where it is.
"""

from __future__ import annotations

import io
import sys

import numpy as np

from tests.test_book_conformance import (
    GOLDEN,
    REFERENCE,
    _reference_available,
    book_public_names,
    run_book_cases,
)


def main() -> int:
    if not _reference_available():
        print(f"the book's code is not at {REFERENCE}", file=sys.stderr)
        return 1
    results = run_book_cases()
    results["public_names"] = np.array(book_public_names())
    buf = io.BytesIO()
    np.savez_compressed(buf, **results)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    tmp = GOLDEN.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(GOLDEN)
    print(f"wrote {GOLDEN} ({len(results)} arrays, {GOLDEN.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
