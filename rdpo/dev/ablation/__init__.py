"""``python -m rdpo.ablation``: base policy vs outcome- vs rubric-based filtering at equal compute
(`run`), its tables, figure and docs section (`report`).
"""
