"""xpconv's benchmarks, run from a checkout (not part of the installed package).

``python -m benchmarks`` runs the throughput suite and writes its JSON under
benchmarks/results/ unless ``--json`` says otherwise; benchmarks/README.md records the
machine, the command and the results.

    harness.py          the suite: implementations side by side, timing loops, targets, tables
    textbook.py         the textbook-style NumPy baseline network
    machine.py          the machine record (from xpconv.info), peak-memory probe, thread limits
    __main__.py         the command line
    distributed.py      data-parallel training over MPI
    memory_predict.py   peak memory of predicting the MNIST test set
    gpu/                the GPU session's scripts
"""
