"""PyTorch reference modules for parity tests (never imported by mia_jax)."""
