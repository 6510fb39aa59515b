"""rdpo's loss family and DPO metrics equal TRL 1.16 DPOTrainer's on the same tiny-VLM batch.

TRL's DPOTrainer collates a vision batch and computes its loss with its own forward (fused LM
head, reference = the PEFT model with adapters disabled). rdpo computes log-probs of the same
batch with its chunked projection and the loss with `rdpo.engine.loss.dpo_objective`. Packed pairs are
shown equal to this plain batch in test_packing.py.

TRL 1.16's sigmoid loss ignores ``label_smoothing`` (it went to its robust and EXO losses);
rdpo keeps conservative DPO there (Mitchell, 2023), tested in test_loss.py. At ε = 0 they agree.
"""

import pytest
import torch

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.slow  # TRL's DPOTrainer training steps

from rdpo.config import ModelConfig  # noqa: E402
from rdpo.engine.logps import sequence_logps  # noqa: E402
from rdpo.engine.loss import dpo_objective  # noqa: E402
from rdpo.model import load_base, load_processor, lora_target  # noqa: E402
from rdpo.pool import load_images, load_pool  # noqa: E402

CHOSEN = ["The circle is red.", "There are two shapes: a blue square and a green triangle."]
REJECTED = ["A dog on a sofa, it is purple.", "One."]

CASES = [
    ("sigmoid", 0.0, 0.0),
    ("robust", 0.1, 0.0),
    ("hinge", 0.0, 0.0),
    ("ipo", 0.0, 0.0),
    ("sigmoid", 0.0, 0.7),  # + SFT term (RPO)
]


@pytest.fixture(scope="module")
def dataset(toy_pools):
    from datasets import Dataset

    records = load_pool(toy_pools.train)[:2]
    return Dataset.from_list([
        {"images": load_images(r),
         "prompt": [{"role": "user", "content": r.instruction}],
         "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": j}]}
        for r, c, j in zip(records, CHOSEN, REJECTED, strict=True)])


@pytest.mark.parametrize(("loss_type", "label_smoothing", "sft_weight"), CASES)
def test_loss_and_metrics_equal_trl(tiny_dir, dataset, tmp_path, loss_type, label_smoothing, sft_weight):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    cfg = ModelConfig(path=str(tiny_dir))
    processor = load_processor(cfg.path)
    base = load_base(cfg)
    with torch.no_grad():  # sharper predictions: log-probs that differ between responses
        base.lm_head.weight.mul_(10)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=lora_target(base, cfg))
    beta = 0.3
    args = DPOConfig(
        output_dir=str(tmp_path), beta=beta, label_smoothing=label_smoothing,
        loss_type=[loss_type, "sft"] if sft_weight else [loss_type],
        loss_weights=[1.0, sft_weight] if sft_weight else None,
        per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False, max_length=None,
        remove_unused_columns=False, dataloader_num_workers=0)
    # TRL wraps the base model in the adapter: its reference is the base (adapters disabled).
    trainer = DPOTrainer(model=base, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=lora)
    model = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter, so policy and reference differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch)).item()
        # model.eval(): TRL files the metrics under "eval"
        metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

        inputs = {k: v for k, v in batch.items() if k not in ("ref_chosen_logps", "ref_rejected_logps")}
        chosen, rejected = sequence_logps(model, inputs).chunk(2)
        with model.disable_adapter():
            ref_chosen, ref_rejected = sequence_logps(model, inputs).chunk(2)
        n_chosen, n_rejected = batch["completion_mask"][:, 1:].sum(1).chunk(2)
        obj = dpo_objective(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected,
                            beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                            sft_weight=sft_weight)

    out = obj.dpo
    assert out.margins.abs().max() > 0.05  # a batch where the rewards say something
    assert obj.loss.item() == pytest.approx(trl_loss, abs=1e-5)
    assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert out.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
    assert out.margins.mean().item() == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    assert out.accuracy.mean().item() == pytest.approx(metrics["rewards/accuracies"], abs=1e-6)
    assert chosen.mean().item() == pytest.approx(metrics["logps/chosen"], abs=1e-4)
    assert rejected.mean().item() == pytest.approx(metrics["logps/rejected"], abs=1e-4)
