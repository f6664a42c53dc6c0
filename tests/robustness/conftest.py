"""Robustness suite: deterministic hypothesis settings (derandomized, few examples) for CI on 2 cores."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "robustness", derandomize=True, max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("robustness")
