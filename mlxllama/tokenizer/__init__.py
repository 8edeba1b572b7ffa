"""One tokenizer interface over sentencepiece, HF `tokenizers` and GGUF-embedded vocabularies; chat templates.

    backends.py       the two libraries doing the work (sentencepiece; HF tokenizers)
    core.py           Tokenizer: encode/decode, BOS/EOS conventions, chat template, save
    chat_template.py  the jinja2 sandbox chat templates render in, with a work budget
    detokenizer.py    StreamingDetokenizer: text token by token, never half a character
    folder.py         load_tokenizer: HF-style folders
    gguf_vocab.py     tokenizer_from_gguf: vocabularies embedded in GGUF files
"""

from .core import Tokenizer
from .detokenizer import StreamingDetokenizer
from .folder import load_tokenizer
from .gguf_vocab import tokenizer_from_gguf

__all__ = ["Tokenizer", "StreamingDetokenizer", "load_tokenizer", "tokenizer_from_gguf"]
