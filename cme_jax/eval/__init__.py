"""Evaluation tooling: pairwise judging, the evaluation and verifier-audit libraries, rewrites and statistics.

The commands that use them are thin modules at the top of the package (`python -m cme_jax.evaluate`,
`python -m cme_jax.audit`).
"""
