"""What the benchmarks start on every rank, under torchrun: one module each, run as ``-m benchmarks.workers.<name>``."""
