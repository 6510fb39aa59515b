"""The embedded demo: a tiny VLM built offline (`tiny`), the synthetic shapes task with its
rubrics (`toy`) and the warm start that teaches the tiny model the task (`warmstart`).

Used by ``toy.enabled`` (the quickstart), the tests and the benchmarks; nothing in the trainer
depends on it.
"""
