"""Test-wide set-up: 8 fake CPU devices for the sharding tests, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# fp32 matmuls at full precision on CPU, so parity tolerances mean what they say.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
