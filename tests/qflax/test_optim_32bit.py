"""Embed/StableEmbed tables keep 32-bit optimizer state through the optax labels recipe."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qflax import linen as qnn


class _Model(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = qnn.Embed(10, 8, name="tok")(ids) + qnn.StableEmbed(10, 8, name="pos")(ids)
        h = h + qnn.Embed8bit(10, 8, name="frozen")(ids)
        return nn.Dense(4, name="head")(h)


def test_marked_paths_are_exactly_the_float_tables():
    variables = _Model().init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
    assert qnn.params_kept_32bit(variables) == [("pos", "embedding"), ("tok", "embedding")]
    labels = qnn.state_labels_32bit(variables)
    assert labels["tok"]["embedding"] == "32bit" and labels["pos"]["embedding"] == "32bit"
    assert labels["pos"]["norm"]["scale"] == "default" and labels["head"]["kernel"] == "default"
    assert qnn.params_kept_32bit({"params": variables["params"]}) == []  # apply-time variables carry no marks


def test_multi_transform_keeps_table_state_in_float32():
    model = _Model()
    ids = jnp.asarray(np.arange(6, dtype=np.int32).reshape(2, 3))
    variables = model.init(jax.random.key(0), ids)
    params = variables["params"]
    tx = optax.multi_transform(
        {"32bit": optax.adam(1e-2), "default": optax.adam(1e-2, mu_dtype=jnp.bfloat16)},
        qnn.state_labels_32bit(variables),
    )
    opt_state = tx.init(params)
    mu = opt_state.inner_states["32bit"].inner_state[0].mu
    assert mu["tok"]["embedding"].dtype == jnp.float32 and mu["pos"]["embedding"].dtype == jnp.float32
    mu_default = opt_state.inner_states["default"].inner_state[0].mu
    assert mu_default["head"]["kernel"].dtype == jnp.bfloat16

    grads = jax.grad(lambda p: jnp.sum(model.apply({**variables, "params": p}, ids)))(params)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int32 and float
        updates, _ = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    changed = np.abs(np.asarray(new_params["tok"]["embedding"] - params["tok"]["embedding"])).max(axis=1)
    assert np.all(changed[np.arange(6)] > 0) and np.all(changed[6:] == 0)  # only looked-up rows move


def test_labels_need_params_and_consistent_marks():
    variables = _Model().init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    with pytest.raises(KeyError, match="variables must hold 'params'"):
        qnn.state_labels_32bit({"optim_bits": variables["optim_bits"]})
    params = {k: v for k, v in variables["params"].items() if k != "tok"}
    with pytest.raises(KeyError, match=r"\('tok', 'embedding'\)"):
        qnn.state_labels_32bit({**variables, "params": params})
