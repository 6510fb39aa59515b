"""The DPO step's engine: a pair's image and prompt encoded once (`encode`, `packing`), image
features cached per prompt (`vision_cache`), completion log-probs without ``[B, T, V]`` logits
(`logps`), the DPO losses (`loss`), a round's pairs collated into batches (`collate`) and
selective activation checkpointing (`recompute`, `saved_memory`).

No Lightning here (tests/test_layers.py checks it).
"""
