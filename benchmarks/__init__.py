"""xpconv's benchmarks, run from a checkout.

``python -m benchmarks`` runs the throughput suite of :mod:`xpconv.bench` (the same
code as the installed ``xpconv bench`` command) and writes its JSON under
benchmarks/results/ unless ``--json`` says otherwise; benchmarks/README.md records
the machine, the command and the results.  benchmarks/distributed.py measures
data-parallel training over MPI.
"""
