"""vqref's benchmarks; not part of the installed package (run them from a checkout).

``python -m benchmarks.bench`` (``make bench``): the CPU benchmarks against the peers;
``benchmarks/gpu.py`` and ``benchmarks/gpu_check.sh``: the GPU ones.  See ``benchmarks/README.md``.
"""
