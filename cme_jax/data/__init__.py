"""Package data shipped with cme_jax: prompt sets and preference pairs (JSONL)."""
