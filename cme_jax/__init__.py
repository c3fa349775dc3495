"""cme_jax: label-free RL post-training of LLMs with Cross-Model Entropy rewards, in JAX."""

import os as _os

# On fake multi-device CPU meshes (xla_force_host_platform_device_count) XLA's concurrency-optimised CPU scheduler
# can start two independent collectives in different orders on different devices, and the program deadlocks until
# XLA aborts it (seen in LoRA's fused step on data=2 x tensor=2). Program order there costs nothing that matters;
# GPUs and TPUs are unaffected. Read by XLA when the backend starts, so it holds when cme_jax is imported first.
_flags = _os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" in _flags and "xla_cpu_enable_concurrency_optimized_scheduler" not in _flags:
    _os.environ["XLA_FLAGS"] = f"{_flags} --xla_cpu_enable_concurrency_optimized_scheduler=false"
