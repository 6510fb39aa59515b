"""Your own LightningModule, trained on-policy with rdpo's data module and round callback.

rdpo's `RubricDPOModule` is not needed: any LightningModule that follows this small protocol
gets rubric-scored rounds from `RubricScoringCallback` and DPO pairs from `OnPolicyDataModule`.

The protocol (what the callback and the data module read from your module):

1. ``self.model``: a transformers VLM wrapped in a PEFT adapter. The callback samples each
   round's responses from it (``model.generate`` through `rdpo.rollout.generate`, adapters on,
   no grad) and computes the pairs' reference log-probs once per pair with the adapter
   disabled (``model.disable_adapter()``), so the reference is the base model.
2. ``self.processor``: its processor (the data module picks it up at setup unless you call
   ``datamodule.connect(processor)`` first). Its tokenizer needs a pad token.
3. ``training_step(batch)`` takes a `PairCollator` batch: the model inputs of B pairs
   (``batch["packed"]``, one row per pair sharing the image and prompt, or
   ``batch["sequences"]``, 2B rows) plus ``ref_chosen_logps`` and ``ref_rejected_logps`` (B floats each:
   ``rdpo.engine.collate.reference_tensors`` makes float32 tensors of them; as tensors a bf16 precision
   plugin would round them).
   `rdpo.engine.packing.pair_logps(model, batch)` gives the policy's (chosen, rejected) log-probs [B]
   for either layout. A round whose filters kept no pair yields ``{"empty": True}`` batches:
   return a zero loss that touches the trainable parameters (not None), so the step still
   counts and DDP stays in step.
4. The trainer: ``max_steps`` with ``max_epochs=-1`` (a round is one epoch of
   ``steps_per_round`` steps) and ``use_distributed_sampler=False`` (the data module shards the
   prompts by rank itself).

Run it on the embedded toy task (builds the tiny model the first time, ~2 min):

    python examples/own_module.py --run-dir runs/own_module
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from rdpo.callbacks import RubricScoringCallback

from rdpo.config import DataConfig, PairsConfig, RolloutConfig
from rdpo.data import OnPolicyDataModule
from rdpo.engine.collate import reference_tensors
from rdpo.engine.packing import packing_support, pair_logps
from rdpo.judging.judges import RuleJudge


class MyPreferenceModule(L.LightningModule):
    """A user's module: its own model loading, its own (sigmoid DPO) loss, its own optimizer."""

    def __init__(self, model_path: str, *, lora_r: int = 8, beta: float = 0.1, lr: float = 1e-3):
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_path)
        if self.processor.tokenizer.pad_token is None:
            self.processor.tokenizer.pad_token = self.processor.tokenizer.eos_token
        base = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
        base.requires_grad_(False)
        lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r,
                          target_modules=r".*language_model.*\.(q_proj|v_proj)")
        self.model = get_peft_model(base, lora)
        self.beta = beta
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if batch.get("empty"):
            return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
        chosen, rejected = pair_logps(self.model, batch)
        ref_chosen, ref_rejected = reference_tensors(batch, chosen)
        # DPO (Rafailov et al., 2023): -log σ(β[(π_c - ref_c) - (π_r - ref_r)])
        logits = self.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        loss = -F.logsigmoid(logits).mean()
        self.losses.append(loss.item())
        self.log("my/loss", loss, on_step=True, batch_size=chosen.shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.lr)


def train(model_path: str, train_pool: str, run_dir: str | Path, *, max_steps: int = 40,
          steps_per_round: int = 20, prompts_per_round: int = 32, samples_per_prompt: int = 4,
          batch_size: int = 8, min_margin: float = 0.1, lr: float = 1e-3,
          seed: int = 0) -> tuple[MyPreferenceModule, RubricScoringCallback, L.Trainer]:
    """Train `MyPreferenceModule` with rubric-scored on-policy rounds; returns the pieces."""
    L.seed_everything(seed, verbose=False)
    module = MyPreferenceModule(model_path, lr=lr)
    datamodule = OnPolicyDataModule(
        DataConfig(train_pool, prompts_per_round=prompts_per_round, batch_size=batch_size),
        steps_per_round=steps_per_round, seed=seed,
        # packed pairs need a model that takes 4-D attention masks (Qwen2-VL and later do)
        packed=packing_support(module.model) is None)
    callback = RubricScoringCallback(
        RuleJudge(), RolloutConfig(samples_per_prompt=samples_per_prompt, max_new_tokens=24),
        PairsConfig(min_margin=min_margin), run_dir=run_dir)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, max_epochs=-1, use_distributed_sampler=False,
        callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir)
    trainer.fit(module, datamodule=datamodule)
    return module, callback, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="VLM checkpoint directory (default: the toy policy)")
    parser.add_argument("--pool", help="rubric pool JSONL (default: the toy training pool)")
    parser.add_argument("--run-dir", default="runs/own_module")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if args.model is None or args.pool is None:
        from rdpo.config import ToyConfig
        from rdpo.demo.warmstart import prepare_toy

        paths = prepare_toy(ToyConfig(enabled=True))
        args.model, args.pool = args.model or str(paths.policy), args.pool or str(paths.train_pool)
    module, callback, _ = train(args.model, args.pool, args.run_dir, max_steps=args.steps)
    for row in callback.history:
        print(f"round {row['round']} (step {row['step']}): mean rubric score "
              f"{row['mean_score']:.3f}, pairs {row['pairs']}/{row['prompts']}")
    print(f"first loss {module.losses[0]:.4f} (ln 2 = {math.log(2):.4f}), "
          f"last {module.losses[-1]:.4f}; rounds in {args.run_dir}/rounds")


if __name__ == "__main__":
    main()
