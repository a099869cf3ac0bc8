"""Benchmarks: is a many-trial Optuna study affordable on a 2-core laptop?

Run them all with ``make bench`` (or ``python -m bench``); ``python -m bench --help`` lists the
options. They are not part of the test suite: timings on a shared machine are noisy, so every
figure is a median over repeats and every comparison is a ratio measured within one run.

- ``bench.throughput``  epoch throughput against the book's DataLoader loop, and the compute floor
- ``bench.tuning``      trials per minute of a fixed Optuna study with 1 and 2 workers
- ``bench.memory``      peak memory of ``python -m pipeline main`` (and of ``tune``, in bench.tuning)
"""
