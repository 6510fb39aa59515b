"""Judging a round's answers against their rubrics: the judges (`judges`), the chat backends they
ask through (`chat`), the persistent judgment cache (`cache`), verdicts → scores (`scoring`) and
the reward-hacking watch of a second judge (`audit`).

No Lightning here (tests/test_layers.py checks it).
"""
