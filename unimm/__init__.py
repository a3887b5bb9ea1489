"""unimm: unified multimodal autoregressive models.

One language model that understands images and generates them: a dual-codebook visual tokenizer
turns images into discrete tokens, any Hugging Face causal LM with an extended vocabulary models
interleaved image-text sequences, and a diffusion detokenizer turns generated tokens into pixels.

Importing ``unimm`` registers its configs and models with the transformers Auto classes (done by the
subpackages' ``__init__``); nothing else happens at import time.
"""

__version__ = "0.1.0.dev0"
