"""Quantized weights across devices: partition specs, the row view, and per-shard ops for ``shard_map``.

- :func:`quantized_shardings` / :func:`quantized_partition_specs`: NamedShardings / PartitionSpecs
  for every array of a tree of (quantized) variables, from ``(pattern, PartitionSpec)`` rules or a
  float model's ``nn.Partitioned`` / logical / NNX annotations (:func:`rules_from_annotations`).
- :func:`to_row_view` / :func:`to_flat_layout`: 4-bit weights in the row view (needed to split
  input features, row-parallel) and back to bitsandbytes' flat layout (for checkpoints).
- ``matmul_4bit_local``, ``matmul_8bit_local``, ``embed_4bit_local``, ``embed_8bit_local``,
  :func:`local_weight`: the ops inside ``shard_map``.

Under ``jax.jit`` the ops of :mod:`qflax.ops` partition sharded weights themselves (XLA's
partitioner on the XLA path, :mod:`qflax.ops.partitioning` for the Triton kernels): no
packed weight is gathered; row-parallel products end in one ``psum``.
"""

from qflax.sharding.layout import to_flat_layout, to_row_view
from qflax.sharding.local import (
    embed_4bit_local,
    embed_8bit_local,
    local_weight,
    matmul_4bit_local,
    matmul_8bit_local,
)
from qflax.sharding.rules import (
    path_string,
    quantized_partition_specs,
    quantized_shardings,
    rules_from_annotations,
)

__all__ = [
    "embed_4bit_local", "embed_8bit_local", "local_weight", "matmul_4bit_local", "matmul_8bit_local",
    "path_string", "quantized_partition_specs", "quantized_shardings", "rules_from_annotations",
    "to_flat_layout", "to_row_view",
]
