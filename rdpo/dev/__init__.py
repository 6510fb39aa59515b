"""Lab work behind the trainer: benchmarks against TRL (`bench`) and the rubric-vs-outcome
ablation (`ablation`). The trainer never imports these.
"""
