"""Tokenizers of the non-Qwen tiny families, trained offline on a small corpus.

Each is the tokenizer class the family's hub checkpoint ships (Qwen2Tokenizer, GPT2Tokenizer,
GemmaTokenizer, Llama 3's PreTrainedTokenizerFast), a BPE trained on the corpus, with the
family's special tokens as single special tokens, the end-of-turn token as eos and a pad token,
so ``AutoTokenizer`` (and the family's processor) loads it back from ``save_pretrained``.
"""

from __future__ import annotations

import json

# Byte-level pre-tokenizer split (Qwen2 / Llama 3 style), so the trained BPE works in the
# byte-level tokenizer classes these families ship (Qwen2Tokenizer, GPT2Tokenizer, Llama 3's).
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# family -> the tokenizer: class, special tokens (in id order, first ids), bos, eos (= the
# end-of-turn token), pad, unk, and the named tokens the processor reads from the tokenizer.
TOKENS = {
    "llava_onevision": dict(
        cls="Qwen2Tokenizer", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>",
                                        "<video>"),
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk="<|endoftext|>",
        named={"image_token": "<image>", "video_token": "<video>"}),
    "idefics3": dict(
        # SmolVLM's SmolLM2 tokenizer: <|im_start|> is its bos (the template writes it).
        cls="GPT2Tokenizer", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                       "<fake_token_around_image>", "<image>",
                                       "<end_of_utterance>", "<global-img>",
                                       *(f"<row_{r}_col_{c}>" for r in range(1, 7)
                                         for c in range(1, 7))),
        bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>", unk="<|endoftext|>",
        named={}),
    "gemma3": dict(
        cls="GemmaTokenizer", specials=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
                                        "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                                        "<end_of_image>", "<image_soft_token>"),
        bos="<bos>", eos="<end_of_turn>", pad="<pad>", unk="<unk>",
        named={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
               "eoi_token": "<end_of_image>"}),
    "internvl": dict(
        cls="Qwen2Tokenizer", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>",
                                        "</img>", "<IMG_CONTEXT>", "<video>"),
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk="<|endoftext|>",
        named={"start_image_token": "<img>", "end_image_token": "</img>",
               "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}),
    "mllama": dict(
        cls="PreTrainedTokenizerFast",
        specials=("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>", "<|image|>"),
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        unk=None, named={}),
}


def train_tokenizer(corpus: list[str], family: str, vocab_size: int = 512):
    """The family's tokenizer class, trained as a BPE on `corpus` with its special tokens."""
    from tokenizers import AddedToken

    spec = TOKENS[family]
    # The chat templates' role words and newlines, often enough to become whole tokens (a
    # prompt's scaffold is a few tokens, as with a real vocabulary, not one per letter).
    scaffold = ["user\n", "assistant\n", "model\n", "system\n", "User:", "Assistant:"] * 20
    tokenizer = _train([*corpus, *scaffold], spec, vocab_size)
    # Every chat/vision marker is one special token (never split by the BPE, skipped when
    # decoding with skip_special_tokens), as in the family's real tokenizer.
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in spec["specials"]],
                         special_tokens=True)
    return tokenizer


def _train(corpus, spec, vocab_size):
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if spec["cls"] == "GemmaTokenizer":
        return _gemma_tokenizer(corpus, spec, vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(spec["specials"]),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    kw = dict(eos_token=spec["eos"], pad_token=spec["pad"], bos_token=spec["bos"],
              extra_special_tokens=spec["named"])
    if spec["unk"]:
        kw["unk_token"] = spec["unk"]
    if spec["cls"] == "PreTrainedTokenizerFast":
        # Llama 3's tokenizer prepends <|begin_of_text|> itself, and its template writes it too:
        # a second one unless the caller tokenizes with add_special_tokens=False.
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, add_bos_token=True, **kw)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return getattr(transformers, spec["cls"])(vocab=state["vocab"], merges=merges, **kw)


def _gemma_tokenizer(corpus, spec, vocab_size):
    """A SentencePiece-style BPE ("▁" for spaces, byte fallback) in `GemmaTokenizer`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # pieces never span words during training ("▁the", not "e▁the▁"), as SentencePiece's
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(spec["specials"]),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    state = json.loads(tok.to_str())["model"]
    vocab = dict(state["vocab"])
    for b in range(256):  # byte-fallback pieces, so an unseen character is never <unk>
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return GemmaTokenizer(vocab=vocab, merges=merges, bos_token=spec["bos"], eos_token=spec["eos"],
                          pad_token=spec["pad"], unk_token=spec["unk"], mask_token="<mask>",
                          extra_special_tokens=spec["named"], add_bos_token=True)
