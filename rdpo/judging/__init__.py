"""Judging a round's answers against their rubrics: the judges (`judges`), the chat backends they
ask through (`chat`), the persistent judgment cache (`cache`) and verdicts → scores (`scoring`).

No Lightning here (tests/test_layers.py checks it).
"""
