"""Stage side of DéjàVu serving: shard-aware decoder models, their KV pools, and the stage process.

A stage holds a contiguous range of a model's layers [a, b) and the KV cache of those layers. The pure
runtime (`stages.runtime.ShardRuntime`) has no sockets and no event loop; `stages.proc` is the process shell.
"""
