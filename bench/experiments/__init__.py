"""One-off experiments, each the record of a decision (its conclusion is in the docs):

    python -m bench.experiments.<name> --help

They share :mod:`bench.common` and write ``bench/results/<name>.json`` like the lasting
benchmarks in :mod:`bench`.
"""
