"""Output error of Dense8bitLt with and without LLM.int8 outlier handling on planted outliers.

Run: ``python benchmarks/dense8bit_outlier_error.py`` (CPU is fine; prints one JSON line).
The layer is 256 -> 128 with torch nn.Linear's default init; the input is 64 tokens of
N(0, 1) with three features scaled by 30 (|x| up to ~100), the systematic outlier features
LLM.int8 was designed for. Errors are against the float64 product of the same float weights.
OutlierAwareDense (outlier dims found by the tracer, kept in float with float weight
columns) is shown for comparison.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from qflax import linen as qnn


def main() -> None:
    rng = np.random.default_rng(9)
    bound = 1 / np.sqrt(256)
    w = rng.uniform(-bound, bound, (128, 256)).astype(np.float32)
    b = rng.uniform(-bound, bound, 128).astype(np.float32)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[:, [7, 100, 200]] *= 30.0
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + b
    variables = qnn.quantize_params({"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}, qnn.Rule(format="8bit"))
    result = {"device": jax.devices()[0].device_kind, "shape": "64x256 -> 128", "outlier_dims": [7, 100, 200]}
    for threshold in (0.0, 6.0):
        y = np.asarray(qnn.Dense8bitLt(128, threshold=threshold).apply(variables, jnp.asarray(x)), np.float64)
        err = np.abs(y - exact)
        result[f"threshold_{threshold:g}"] = {
            "mean_abs_err": float(err.mean()),
            "max_abs_err": float(err.max()),
            "rel_fro_err": float(np.linalg.norm(y - exact) / np.linalg.norm(exact)),
        }
    layer = qnn.OutlierAwareDense(128)
    float_vars = {"params": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}}
    dims = qnn.find_outlier_dims(layer, float_vars, jnp.asarray(x), threshold=6.0)
    aware_vars = qnn.quantize_outlier_aware(layer, float_vars, dims, jnp.asarray(x))
    y = np.asarray(layer.apply(aware_vars, jnp.asarray(x)), np.float64)
    result["outlier_aware_dense"] = {
        "found_dims": dims[()].tolist(),
        "mean_abs_err": float(np.abs(y - exact).mean()),
        "max_abs_err": float(np.abs(y - exact).max()),
        "rel_fro_err": float(np.linalg.norm(y - exact) / np.linalg.norm(exact)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
