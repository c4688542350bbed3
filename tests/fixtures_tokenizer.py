"""The tiny offline CLIP tokenizer of the tests is the library's (`safealign_jax.tiny_pipeline`);
this name stays for tests/test_evaluate_script.py until its pending edit lands."""

from safealign_jax.tiny_pipeline import write_clip_tokenizer as write_tiny_clip_tokenizer

__all__ = ["write_tiny_clip_tokenizer"]
