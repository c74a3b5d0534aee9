"""Benchmarks of DéjàVu serving (`dejavu-bench`): each measures one layer of the system against a baseline or a
hardware ceiling taken in the same run, and writes JSON + a plot. Beside the product, not inside it: this
package may import every other one, and nothing imports it (tests/test_layering.py). The load generator that
users point at a running deployment (`dejavu-bench serve`) is part of the product and lives in bus/loadgen.py."""
