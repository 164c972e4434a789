"""Duet kernels: Triton paged attention, KV store and layer ops (CUDA), thin wrappers over the compiled CPU ops
of csrc/ (``cpu_attention``, ``cpu_layers``, ``kv_blocks``; loaded by ``extension``), and plain torch references
of every kernel (``reference``), which are the test oracle and the fallback when the extension is not built.

The paged KV pool of one engine is a single tensor::

    kv_cache  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]   (2 = key, value)

so one layer's keys are ``kv_cache[layer, 0]`` (``[num_blocks, block_size, num_kv_heads, head_dim]``) and
one block of one layer's keys (or values) is a contiguous ``block_size * num_kv_heads * head_dim`` run.
Slot ``s`` of a layer is token ``s % block_size`` of block ``s // block_size``; slot -1 is padding.
"""
