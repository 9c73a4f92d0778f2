"""A tiny real causal LM, built from a config: no hub download needed.

The quickstart, the tests and the examples train it on CPU in seconds. It is a genuine
``LlamaForCausalLM`` (random weights, real config) with a byte-level BPE tokenizer trained on the
caller's texts, so every code path of the trainer (bitsandbytes NF4, LoRA, chat template, loss
mask) runs exactly as it would on a hub model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["TINY_SPECIAL_TOKENS", "make_tiny_model"]

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def make_tiny_model(
    out_dir: Path,
    texts: Iterable[str],
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: int = 512,
    seed: int = 0,
    init_std: float = 0.2,
) -> Path:
    """Train a tokenizer on ``texts`` and save it with a randomly initialised model.

    The same arguments give byte-identical files. The tokenizer has no chat template, so the
    trainer's ChatML default (``protocol.DEFAULT_CHAT_TEMPLATE``) is used; its special tokens
    ``<|im_start|>``/``<|im_end|>`` are already in the vocabulary. ``<|endoftext|>`` is the eos and
    pad token; generation also stops at ``<|im_end|>``.

    Args:
        out_dir: Folder to write (created); existing files are overwritten.
        texts: Training text for the tokenizer (e.g. every message of a chat dataset).
        arch: Only ``"llama"`` for now.
        hidden_size: Model width.
        layers: Decoder layers.
        heads: Attention heads.
        kv_heads: Key/value heads (grouped-query attention when fewer than ``heads``).
        intermediate: MLP width.
        vocab_size: Target vocabulary size of the BPE tokenizer (at least 260).
        seed: Seed of the weight initialisation.
        init_std: Standard deviation of the random weights. Larger than the usual 0.02 on
            purpose: LoRA leaves the random ``lm_head`` frozen, and with 0.02 its logits cannot
            grow past about +-1, so the loss could never fall far below ln(vocab).

    Returns:
        ``out_dir``, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    Raises:
        ValueError: an unknown ``arch``, a ``vocab_size`` below 260, or no texts.
    """
    if arch != "llama":
        raise ValueError(f"make_tiny_model: arch={arch!r} is not supported; use 'llama'")
    if vocab_size < 260:
        raise ValueError(f"make_tiny_model: vocab_size={vocab_size} is below the 260 minimum")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    corpus = [t for t in texts if t]
    if not corpus:
        raise ValueError("make_tiny_model: no texts to train the tokenizer on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(TINY_SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
    )
    tokenizer.save_pretrained(out_dir)

    eos_id = int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))  # type: ignore[arg-type]
    im_end_id = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))  # type: ignore[arg-type]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        eos_token_id=[im_end_id, eos_id], pad_token_id=eos_id, bos_token_id=None
    )
    model.save_pretrained(out_dir)
    return out_dir
