"""The world's text side: a word-level CLIP tokenizer and a small random CLIP text encoder, both
written as the files of a diffusers pipeline (`tokenizer/`, `text_encoder/`) and read back by the
library's ordinary loaders.

The tokenizer is a real CLIP byte-level BPE whose merges spell every world word as ONE token
(checked against transformers' CLIPTokenizer). The text encoder stays frozen at its seeded random
initialisation: its token states keep the identity of each word, which is all the UNet's
cross-attention needs to learn the world.
"""

from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from safealign_jax.convert.files import write_safetensors
from safealign_jax.convert.names import state_dict_from_params
from safealign_jax.errors import check
from safealign_jax.models.clip import CLIP_NAMES, CLIPTextConfig, CLIPTextModel
from safealign_jax.tiny_pipeline import byte_symbols

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one lower-case word (the last symbol carries "</w>")."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges (in rank order) under which every word of `words` is a single token."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for word in words:
            parts = _bpe(word, ranks)
            while len(parts) > 1:
                pair = (parts[0], parts[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                parts = _bpe(word, ranks)
                changed = True
    return merges


def write_tokenizer(folder: str, words: list[str], max_length: int) -> dict[str, int]:
    """Writes a CLIP tokenizer folder whose vocabulary spells each of `words` as one token.

    Returns the vocabulary (token -> id); the last two ids are <|startoftext|>, <|endoftext|>.
    """
    os.makedirs(folder, exist_ok=True)
    words = sorted({w.lower() for w in words})
    merges = word_merges(words)
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
                   "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, f)
    return vocab


def check_single_tokens(tokenizer, words: list[str]) -> None:
    """Raises if a world word is not one token of `tokenizer` (a broken vocabulary)."""
    for word in words:
        ids = tokenizer(word)["input_ids"]
        check(len(ids) == 3, f"the world tokenizer splits {word!r} into {len(ids) - 2} tokens.")


CONTEXT_SCALE = 0.2  # self-attention output scale of the world's random text encoder


def text_encoder_config(vocab_size: int, max_length: int, width: int, layers: int, heads: int) -> dict:
    """A transformers CLIPTextConfig dict for the world's encoder."""
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 2 * width,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "max_position_embeddings": max_length, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "projection_dim": width, "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


def write_text_encoder(folder: str, config: dict, seed: int) -> None:
    """Writes `config.json` + `model.safetensors` of a seeded random CLIP text encoder.

    Token and position embeddings ~ N(0, 1) and N(0, 0.1) and self-attention outputs scaled by
    CONTEXT_SCALE, so each word's identity dominates its state and an unseen phrasing around a
    word changes it little (with Flax's default initialisation alone, the mix of the preceding
    words is as large as the word itself: the base then misreads held-out phrasings); the rest
    keeps Flax's default initialisation.
    """
    os.makedirs(folder, exist_ok=True)
    module = CLIPTextModel(CLIPTextConfig.from_transformers(config, "world text encoder"))
    params = jax.device_get(module.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"])
    rng = np.random.default_rng(seed)
    emb = params["text_model"]["embeddings"]
    emb["token_embedding"]["embedding"] = rng.standard_normal(emb["token_embedding"]["embedding"].shape).astype(np.float32)
    emb["position_embedding"]["embedding"] = 0.1 * rng.standard_normal(emb["position_embedding"]["embedding"].shape).astype(np.float32)
    for layer in params["text_model"]["encoder"].values():
        layer["self_attn"]["out_proj"]["kernel"] = CONTEXT_SCALE * np.asarray(layer["self_attn"]["out_proj"]["kernel"])
    state = {k: np.ascontiguousarray(v, np.float32) for k, v in state_dict_from_params(params, CLIP_NAMES).items()}
    write_safetensors(os.path.join(folder, "model.safetensors"), state, {"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
