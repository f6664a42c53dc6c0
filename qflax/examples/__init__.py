"""Worked examples: real models built from qflax layers."""
