"""Test-session set-up.

Four virtual CPU devices, so data-parallel code paths run for real on a machine with one CPU: XLA
reads this flag once, when JAX starts, hence before anything imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("SDJAX_OFFLINE", "1")  # tests never touch the network
