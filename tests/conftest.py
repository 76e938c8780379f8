"""Test-session set-up: a persistent XLA compilation cache shared by the tests and their subprocesses.

Many tests compile the same small programs (the tiny U-Net's step, in several main.py subprocesses);
the on-disk cache compiles each once per machine. Set before jax is imported.
"""

import os

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache', 'jax')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
