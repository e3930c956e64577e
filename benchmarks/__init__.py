"""Benchmarks: latency, throughput, memory and parity against PyTorch and peers.

The systems are declared here, light to import, so that the CLI can list them without the `bench` extra.
"""

ALL_SYSTEMS = ("engine-fp32", "engine-int8", "engine-int4", "pytorch", "optimum-fp32", "optimum-int8",
               "ctranslate2-int8", "llamacpp-f32", "llamacpp-q8_0", "llamacpp-q4_0", "llamacpp-q4_k_m")
