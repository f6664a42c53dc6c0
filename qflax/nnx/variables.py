"""The NNX variable type of frozen quantized weights.

Quantized weights (a :class:`~qflax.quant.Packed4bit` or :class:`~qflax.quant.Int8Rows`
pytree) live in :class:`QuantizedWeight`, a sibling of ``nnx.Param`` rather than a
subclass. Every NNX transform that filters by variable type therefore leaves them out of
training by default: ``nnx.grad`` differentiates ``nnx.Param`` only, and
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` never builds optimizer state for them, while
``nnx.split``/``nnx.merge``/``nnx.state``, ``nnx.jit``, ``nnx.vmap``/``nnx.scan`` and orbax
carry them like any other state (their arrays are ordinary pytree leaves, the shape, dtype
and quantization settings are static pytree metadata).

The type is registered under the Linen collection name ``"quantized"``, the collection in
which the qflax Linen modules keep the same weights, so Linen variables and NNX state map
onto each other one to one.
"""

from flax import nnx

from qflax.layers.names import QUANTIZED


class QuantizedWeight(nnx.Variable):
    """A frozen quantized weight: holds a ``Packed4bit`` or ``Int8Rows`` pytree.

    Read it with ``variable.get_value()``. Filter it with the class itself, e.g.
    ``nnx.state(model, QuantizedWeight)``.

    Example:
      >>> w = QuantizedWeight(quant.quantize_4bit(jnp.ones((8, 64))))
      >>> w.get_value().quant_type
      'nf4'
    """


nnx.register_variable_name(QUANTIZED, QuantizedWeight)
