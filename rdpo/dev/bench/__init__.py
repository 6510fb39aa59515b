"""``python -m rdpo.bench``: rdpo's DPO step against TRL (`dpo`, run per setting in its own
process by `workers`), a round's sampling per rollout engine (`rollout`); the model and pairs
they share are built by `fixtures`.
"""
