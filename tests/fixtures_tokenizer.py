"""A tiny offline CLIP tokenizer (byte-level BPE) written as the files of a hub `tokenizer/` folder.

Vocabulary: the 256 byte symbols, the same with "</w>" (end of word), four merged words
("the", "cat" with their merges), then <|startoftext|> and <|endoftext|> (the last two ids).
"""

import json
import os

MERGES = ("t h", "th e</w>", "c a", "ca t</w>")


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP's reversible byte -> printable character table, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_tiny_clip_tokenizer(folder, model_max_length: int = 77) -> str:
    """Writes vocab.json, merges.txt and tokenizer_config.json into `folder`; returns its path."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length}, f)
    return folder
