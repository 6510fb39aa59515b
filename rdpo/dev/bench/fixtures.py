"""What the benchmarks share: the model shapes, the random-init model, its pool of pairs, and
the model settings every run loads them with."""

from __future__ import annotations

import json
import random
from pathlib import Path

LORA = dict(r=16, alpha=32, target=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")

SHAPES = {
    # CPU: hidden 256, 4 layers, 448×448 images (256 image tokens), Qwen's real vocabulary.
    "cpu": dict(hidden=256, layers=4, head_dim=64, intermediate=1024, vocab_size=151936,
                vision_hidden=256, vision_layers=4),
    # The CPU shape with the toy tokenizer's 475-token vocabulary: the output layer out of the
    # picture (what the step costs without the vocabulary's share).
    "cpu-small-vocab": dict(hidden=256, layers=4, head_dim=64, intermediate=1024,
                            vision_hidden=256, vision_layers=4),
    # The test suite's smoke run (head_dim 32: the smallest vLLM's CPU attention serves).
    "tiny": dict(hidden=64, layers=2, head_dim=32, vocab_size=4096),
    # A Qwen2-VL-2B-class shape for a GPU (bf16).
    "2b": dict(hidden=1536, layers=28, head_dim=128, intermediate=8960, vocab_size=151936,
               vision_hidden=1280, vision_layers=32, kv_heads=2),
}


def build(out: Path, shape: str, pairs: int, response_tokens: int, image_side: int, seed: int,
          images: int = 1) -> None:
    """The model (random init), its processor and a pool of `pairs` prompts, each with `images`
    images and two responses."""
    from PIL import Image

    from rdpo.demo import toy
    from rdpo.demo.tiny import build_tiny_vlm

    build_tiny_vlm(out / "model", toy.corpus(), image_pixels=image_side * image_side, seed=seed,
                   **SHAPES[shape])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "model")
    rng = random.Random(seed)
    words = sorted({w for s in toy.corpus() for w in s.split()})
    (out / "images").mkdir(exist_ok=True)

    def response() -> str:
        ids = tok(" ".join(rng.choices(words, k=4 * response_tokens)), add_special_tokens=False)["input_ids"]
        return tok.decode(ids[:response_tokens - 1]).strip()

    with open(out / "pool.jsonl", "w") as f, open(out / "responses.jsonl", "w") as g:
        for i in range(pairs):
            names = [f"images/{i}-{k}.png" for k in range(images)]
            for name in names:
                pixels = bytes(rng.randrange(256) for _ in range(3 * 64 * 64))
                Image.frombytes("RGB", (64, 64), pixels).resize((image_side, image_side)).save(out / name)
            f.write(json.dumps({
                "id": f"bench-{i}", "images": names,
                "instruction": "Describe the picture in detail.",
                "rubric": {"essential": [{"id": "E1", "text": "Describes the picture."}]}}) + "\n")
            g.write(json.dumps({"chosen": response(), "rejected": response()}) + "\n")


def pool(work: Path, n: int):
    from rdpo.pool import load_pool

    lines = [json.loads(x) for x in (work / "responses.jsonl").read_text().splitlines()][:n]
    return (load_pool(work / "pool.jsonl")[:n], [x["chosen"] for x in lines],
            [x["rejected"] for x in lines])


def model_config(work: Path, precision: str, gc: bool | str = False):
    from rdpo.config import LoraConfig, ModelConfig

    return ModelConfig(path=str(work / "model"), dtype="bfloat16" if precision == "bf16" else "float32",
                       lora=LoraConfig(r=LORA["r"], alpha=LORA["alpha"], target_modules=LORA["target"]),
                       gradient_checkpointing=gc)
