"""DéjàVuLib: KV-cache streaming (library + the per-host streamer process). Public API and its contract:
streamer/api.py. Importing this package is cheap and works without CUDA or CuPy."""
