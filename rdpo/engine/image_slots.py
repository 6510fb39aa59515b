"""Mllama: a prompt's log-probs do not depend on the image slots its batch pads.

Llama 3.2 Vision's text tokens read the images through cross-attention layers. The processor
(and `rdpo.engine.encode.pad_to`) pads a batch's image slots to its largest image count:
``cross_attention_mask`` [batch, tokens, images, tiles] and ``pixel_values`` [batch, images,
tiles, ...] get zero slots for the prompts with fewer images. A text token that sees no image
(the prompt's header, before ``<|image|>``) has an all-zero mask row, and transformers
(``_prepare_cross_attention_mask``) turns such a row into *no* mask: it multiplies the additive
mask by ``full_text_row_masked_out_mask``, which is 0 for the row. The token then attends evenly
to every key of its batch row, the padded slots' too, and the layer zeroes only its MLP output,
not its attention output. So the header's hidden states, and through self-attention every later
token's, depend on how many slots the batch padded: up to 0.09 nats on an answer's log-prob on
the tiny build (a one-image prompt batched with a two-image one). rdpo batches a prompt
differently in the rollout, the round's reference pass and the DPO steps, so a pool that mixes
image counts would train on references that its steps do not reproduce.

`isolate_image_slots` installs a forward pre-hook on Mllama's language model that closes, for
those blind rows only, the keys of the slots their prompt does not show. A slot is the prompt's
when any token of the row sees any tile of it (the processor marks each image's real tiles for
the tokens after its ``<|image|>``); the blind rows then attend to every key of the prompt's own
slots, its images' padded tiles included, which is exactly what they attend to when the prompt
is alone in its batch. A closed key gets the mask's minimum, whose softmax weight is exactly 0,
so the attention output is the prompt-alone one up to the kernel's reduction order (measured
within 1.6e-5 nats on the tiny build, fp32; a prompt alone is left bit for bit as it was).
Rows that see an image are left as they are (the processor's mask already closes every other
slot to them), and so is a row whose prompt shows no image: alone, its cross-attention layers
would be skipped, which no mask can imitate.

Why a hook rather than padding every batch to one slot count for the run: the prompt's numbers
become those of the prompt alone (the model's own single-prompt forward), whatever the batch,
in every place rdpo runs the model (`rdpo.rollout.generate`, the reference pass and the steps,
packed or plain, with or without `rdpo.engine.vision_cache`), and nothing needs to know the pool's
largest image count. The hook only rewrites a mask that ``MllamaModel.forward`` has just built
for this call; the model's own forward, ``generate`` and PEFT wrappers stay as they are.
"""

from __future__ import annotations

import torch

from rdpo.families import family_of, unwrap

HOOK = "_rdpo_isolate_image_slots"
"""Attribute of Mllama's language model holding the hook's handle (installed once)."""


def isolate_image_slots(model) -> bool:
    """Install the blind-row hook on `model` (PEFT-wrapped or not) if it is an Mllama model and
    has none yet; True when `model` has it (False for every other family, which needs none)."""
    base = unwrap(model)
    family = family_of(base)
    if family is None or family.name != "mllama":
        return False
    trunk = base.model
    language_model = trunk.language_model
    if getattr(language_model, HOOK, None) is None:
        # Keys per image slot: every tile's patches, as MllamaModel.forward repeats each
        # (image, tile) entry of cross_attention_mask over the vision model's patches.
        slot = trunk.vision_model.num_patches * base.config.vision_config.max_num_tiles
        handle = language_model.register_forward_pre_hook(CloseForeignSlots(slot),
                                                          with_kwargs=True)
        setattr(language_model, HOOK, handle)
    return True


class CloseForeignSlots:
    """The forward pre-hook of Mllama's language model (a class, not a closure, so a model that
    carries it still pickles and deep-copies)."""

    def __init__(self, slot: int):
        self.slot = slot
        """Keys per image slot in the additive cross-attention mask."""

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("cross_attention_mask")  # additive [B, 1, T, slots × slot]
        rows = kwargs.get("full_text_row_masked_out_mask")  # [B, 1, T, 1], 0 on blind rows
        if mask is None or rows is None:
            return None
        blind = rows[:, 0, :, 0] == 0  # [B, T]
        if not bool(blind.any()):
            return None  # a decoding step: the new tokens see their images
        b, _, _, keys = mask.shape
        if keys % self.slot:
            raise ValueError(f"Mllama cross_attention_mask has {keys} keys per token, not a "
                             f"multiple of {self.slot} (vision_model.num_patches × max_num_tiles)")
        seen = ((mask[:, 0] == 0) & ~blind[..., None]).any(1)  # [B, keys] read by a seeing row
        own = seen.view(b, keys // self.slot, self.slot).any(-1)  # [B, slots] the prompt's own
        closed = (~own & own.any(-1, keepdim=True)).repeat_interleave(self.slot, -1)  # [B, keys]
        # In place: this mask is the tensor MllamaModel.forward built for this call alone.
        mask.masked_fill_(blind[:, None, :, None] & closed[:, None, None, :],
                          torch.finfo(mask.dtype).min)
        return args, kwargs
