"""Every VLM family on its tiny build: what `rdpo.families` says matches the model and the
processor, and packed pairs give the log-probs and gradients of separate forwards."""

import contextlib
import re

import pytest
import torch

from rdpo.config import RolloutConfig
from rdpo.demo import toy
from rdpo.demo.tiny import FAMILIES, TOY_IMAGE_PIXELS, build_tiny_vlm
from rdpo.engine import image_slots, packing
from rdpo.engine.encode import collate_sequences, encode_prompt, pad_batch
from rdpo.engine.logps import sequence_logps, unwrap
from rdpo.engine.packing import pack_pairs, packed_logps, packing_support
from rdpo.families import end_of_turn_id, family_of, processor_family, vision_token_ids
from rdpo.pool import load_pool
from rdpo.rollout import generate

CHOSEN = ["There is a red circle on the left.", "Blue.", "Two shapes: a green square."]
REJECTED = ["A purple triangle and a dog and a blue square on the right side.", "Red red red.", "No."]


@pytest.fixture(scope="module")
def mixed_pools(toy_pools, tmp_path_factory):
    """(images only, with video): toy records 0, 1, 3 as two images, one image (or a video of
    4 frames), one image."""
    from family_pools import reshape_pool

    root = tmp_path_factory.mktemp("mixed_pools")
    pools = [reshape_pool(toy_pools.train, root / f"{kind}.jsonl", multi_image=True, video=kind == "video")
             for kind in ("images", "video")]
    return [[load_pool(p)[i] for i in (0, 1, 3)] for p in pools]


def mixed_prompts(processor, mixed_pools):
    """Encoded mixed prompts: the video variant where the family takes videos."""
    records = mixed_pools[1] if processor_family(processor).video else mixed_pools[0]
    assert [len(r.images) for r in records][::2] == [2, 1]
    return [encode_prompt(processor, r) for r in records]


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family = request.param
    path = build_tiny_vlm(tmp_path_factory.mktemp(family), toy.corpus(), family=family,
                          image_pixels=TOY_IMAGE_PIXELS.get(family, 112 * 56))
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    # Random init gives near-uniform predictions; a sharper output layer makes a wrong position
    # or a wrong mask show in the log-probs.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return family, model, processor


def test_family_is_recognised_from_model_and_processor(built):
    name, model, processor = built
    assert family_of(model).name == name
    assert processor_family(processor).name == name


def test_end_of_turn_is_the_templates(built):
    _, _, processor = built
    # The chat template closes an assistant turn with the family's end-of-turn token.
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Blue sky"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    tok = processor.tokenizer
    after = text[text.index("Blue sky") + len("Blue sky"):]
    first = tok(after, add_special_tokens=False)["input_ids"][0]
    assert first == end_of_turn_id(processor) != tok.unk_token_id


def test_vision_tokens_are_suppressed(built):
    _, model, processor = built
    ids = vision_token_ids(processor)
    image_token = getattr(processor, "image_token", None)
    assert processor.tokenizer.convert_tokens_to_ids(image_token) in ids
    config_id = getattr(model.config, "image_token_id", None)
    config_id = config_id if config_id is not None else model.config.image_token_index
    assert config_id in ids  # the placeholder the model replaces with image features
    assert end_of_turn_id(processor) not in ids


def test_lora_target_is_the_language_model_and_nf4_skips_the_vision_tower(built):
    _, model, _ = built
    family = family_of(model)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = [n for n in names if re.fullmatch(family.lora_target, n)]
    lm = f"model.{family.language_model}."
    assert targets and all(n.startswith(lm) for n in targets)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(n.endswith(proj) for n in targets), proj
    # Every Linear outside the language model (vision tower, projector) is kept out of 4 bits.
    outside = [n for n in names if not n.startswith(lm) and n != "lm_head"]
    assert outside
    assert all(any(n == p or n.startswith(p + ".") for p in family.nf4_skip) for n in outside)


def separate(model, processor, prompts, chosen, rejected):
    seqs = collate_sequences(processor, prompts * 2, [*chosen, *rejected])
    return sequence_logps(model, seqs).chunk(2)


def test_batched_prompts_equal_each_alone(built, mixed_pools):
    """Two images, one image (a video for Qwen) in one batch: padding the per-image fields
    (image counts differ) changes no log-prob (Mllama: through `rdpo.engine.image_slots`)."""
    name, model, processor = built
    prompts, chosen = mixed_prompts(processor, mixed_pools), CHOSEN
    with torch.no_grad():
        batched = sequence_logps(model, collate_sequences(processor, prompts, chosen))
        alone = torch.cat([sequence_logps(model, collate_sequences(processor, [p], [c]))
                           for p, c in zip(prompts, chosen, strict=True)])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("sliding", [None, 6])
def test_packed_equals_separate_forwards(built, mixed_pools, sliding):
    name, model, processor = built
    text = model.config.get_text_config()
    if sliding is not None:
        if "sliding_attention" not in (getattr(text, "layer_types", None) or ()):
            pytest.skip(f"{name} has no sliding-window layers")
        # A window shorter than the prompt: the rejected tokens must get theirs by position.
        text.sliding_window, saved = sliding, text.sliding_window
    try:
        assert packing_support(model) is None
        prompts = mixed_prompts(processor, mixed_pools)
        weight = model.get_parameter(f"model.{family_of(model).language_model}.layers.0.mlp.down_proj.weight")
        got = []
        for packed in (False, True):
            weight.requires_grad_(True)
            if packed:
                c, r = packed_logps(model, pack_pairs(processor, prompts, CHOSEN, REJECTED))
            else:
                c, r = separate(model, processor, prompts, CHOSEN, REJECTED)
            (c - 2 * r).sum().backward()
            got.append((c.detach(), r.detach(), weight.grad.clone()))
            weight.requires_grad_(False)
            weight.grad = None
    finally:
        if sliding is not None:
            text.sliding_window = saved
    (want_c, want_r, want_g), (c, r, g) = got
    assert (want_c - want_r).abs().max() > 1.0  # chosen and rejected really differ
    torch.testing.assert_close(c, want_c, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(r, want_r, atol=1e-4, rtol=1e-5)
    assert g.abs().max() > 0
    torch.testing.assert_close(g, want_g, atol=1e-4, rtol=1e-4)


def test_packed_image_blocks_matter_for_gemma3(built, mixed_pools):
    """Without Gemma 3's bidirectional image blocks the packed log-probs would differ: the
    equality above is not an accident of the tiny model."""
    name, model, processor = built
    if name != "gemma3":
        pytest.skip("Gemma 3 only")
    from rdpo import families

    prompts = mixed_prompts(processor, mixed_pools)
    batch = pack_pairs(processor, prompts, CHOSEN, REJECTED)
    with torch.no_grad():
        want = packed_logps(model, batch)
        gemma = families.FAMILIES["gemma3"]
        try:
            object.__setattr__(gemma, "image_blocks", None)
            causal_only = packed_logps(model, batch)
        finally:
            object.__setattr__(gemma, "image_blocks", "token_type_ids")
    assert (want[0] - causal_only[0]).abs().max() > 1e-3


def test_packed_cross_attention_rows_for_mllama(built, mixed_pools):
    """Mllama's answer tokens read the image through cross_attention_mask rows (the prompt's
    last row): packed = separate also on prompts of one image each (no padded image slot),
    and answer rows shut off from the image change the
    log-probs (~2 nats here), so the equality above is not an accident of the tiny model."""
    name, model, processor = built
    if name != "mllama":
        pytest.skip("Mllama only")
    prompts = mixed_prompts(processor, mixed_pools)[1:]
    chosen, rejected = CHOSEN[1:], REJECTED[1:]
    batch = pack_pairs(processor, prompts, chosen, rejected)
    assert batch["cross_attention_mask"].shape[2] == 1  # one image slot: nothing padded
    with torch.no_grad():
        want = separate(model, processor, prompts, chosen, rejected)
        got = packed_logps(model, batch)
        seg = batch["segments"]
        answers = (seg == packing.CHOSEN) | (seg == packing.REJECTED)
        cam = batch["cross_attention_mask"]
        last = cam[torch.arange(len(seg)), (seg == packing.PROMPT).sum(1) - 1]  # [B, images, tiles]
        assert last.any(-1).all() and (cam == last[:, None]).flatten(2).all(-1)[answers].all()
        blind = packed_logps(model, {**batch, "cross_attention_mask": cam * ~answers[..., None, None]})
    for w, g, b in zip(want, got, blind, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)
        assert (b - w).abs().max() > 0.1


@contextlib.contextmanager
def slot_hook_off(model):
    """Mllama's own forward for the duration: `rdpo.engine.image_slots`' hook removed, and none
    installed meanwhile by the log-prob functions."""
    language_model = unwrap(model).model.language_model
    assert image_slots.isolate_image_slots(model)
    getattr(language_model, image_slots.HOOK).remove()
    setattr(language_model, image_slots.HOOK, "off")
    try:
        yield
    finally:
        setattr(language_model, image_slots.HOOK, None)
        assert image_slots.isolate_image_slots(model)


def test_mllama_log_probs_do_not_depend_on_the_batch(built, mixed_pools):
    """Mllama's text rows blind to every image (the prompt's header) attend to their own image
    slots only (`rdpo.engine.image_slots`): a one-image prompt batched with a two-image one (its second
    slot padded), plain and packed, has the log-probs it has alone; without the hook they move
    (transformers lets those rows average over the padded slot too)."""
    name, model, processor = built
    if name != "mllama":
        pytest.skip("Mllama only")
    prompts = mixed_prompts(processor, mixed_pools)  # 2, 1, 1 images
    with torch.no_grad():
        alone = torch.tensor([[float(x[0]) for x in separate(model, processor, [p], [c], [r])]
                              for p, c, r in zip(prompts, CHOSEN, REJECTED, strict=True)]).T
        plain = torch.stack(separate(model, processor, prompts, CHOSEN, REJECTED))
        packed = torch.stack(packed_logps(model, pack_pairs(processor, prompts, CHOSEN, REJECTED)))
        seqs = collate_sequences(processor, prompts * 2, [*CHOSEN, *REJECTED])
        assert seqs["cross_attention_mask"].shape[2] == 2  # the one-image prompts' padded slot
        with slot_hook_off(model):
            unhooked = torch.stack(sequence_logps(model, seqs).chunk(2))
    print(f"mllama batched vs alone: plain {(plain - alone).abs().max():.2e}, packed "
          f"{(packed - alone).abs().max():.2e}; without the hook "
          f"{(unhooked - alone)[:, 1:].abs().min():.4f}-{(unhooked - alone).abs().max():.4f}")
    torch.testing.assert_close(plain, alone, atol=2e-5, rtol=0)
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=0)
    torch.testing.assert_close(unhooked[:, 0], alone[:, 0], atol=2e-5, rtol=0)  # no padded slot
    assert (unhooked - alone)[:, 1:].abs().max() > 0.05  # the one-image prompts' shift


def test_mllama_sampling_does_not_depend_on_the_batch(built, mixed_pools):
    """The rollout samples a one-image Mllama prompt from the distribution it has alone, when
    its left-padded batch holds a two-image prompt: `rdpo.rollout.generate` installs the hook."""
    name, model, processor = built
    if name != "mllama":
        pytest.skip("Mllama only")
    records = mixed_pools[0][:2]  # 2 images, 1 image
    settings = RolloutConfig(samples_per_prompt=1, max_new_tokens=4, temperature=0)
    together = list(generate(model, processor, records, settings))
    alone = [next(generate(model, processor, [r], settings)) for r in records]
    assert getattr(model.model.language_model, image_slots.HOOK) is not None
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    # The next-token distributions of the prompts' last positions (what generate samples from).
    prompts = [encode_prompt(processor, r) for r in records]
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        batch = pad_batch(prompts, pad, side="left")
        assert batch["cross_attention_mask"].shape[2] == 2
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate's
        got = model(**batch, position_ids=positions).logits[:, -1].log_softmax(-1)
        want = torch.cat([model(**p).logits[:, -1].log_softmax(-1) for p in prompts])
    print(f"mllama next-token log-probs batched vs alone: {(got - want).abs().max():.2e}")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
