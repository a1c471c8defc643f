"""numgpt: GPT-2 from first principles on NumPy."""

__version__ = "0.1.0"
