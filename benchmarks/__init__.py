"""Benchmarks: latency, throughput, memory and parity against PyTorch and peers."""
