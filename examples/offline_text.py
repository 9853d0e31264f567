"""Real English text and a tokenizer that need no download: for the examples, the benchmarks and the tests.

The sentences come from the docstrings of the Python standard library (always installed); the tokenizer is a
small WordPiece or byte-level BPE trained on them with Hugging Face ``tokenizers``. Nothing touches the network.

Not part of the installed package (no library code uses it). The examples import it as ``offline_text`` (Python puts
a script's folder first on ``sys.path``), the benchmarks add this folder to ``sys.path`` first, and the tests import
it as ``examples.offline_text`` (pytest puts the checkout's root on ``sys.path``).
"""

from __future__ import annotations

import importlib
import inspect
import random
import re

STDLIB_MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "mailbox", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _docstrings(module_name: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    yield inspect.getdoc(module) or ""
    for _, member in sorted(vars(module).items()):
        if getattr(member, "__module__", None) == module.__name__ and (inspect.isclass(member) or callable(member)):
            yield inspect.getdoc(member) or ""
            if inspect.isclass(member):
                for _, method in sorted(vars(member).items()):
                    if callable(method):
                        yield inspect.getdoc(method) or ""


def stdlib_sentences(min_chars: int = 40, max_chars: int = 240, seed: int = 0) -> list[str]:
    """Distinct English sentences from standard-library docstrings, shuffled deterministically."""
    seen: dict[str, None] = {}
    for name in STDLIB_MODULES:
        for doc in _docstrings(name):
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())
                for sentence in _SENTENCE_END.split(text):
                    letters = sum(c.isalpha() or c == " " for c in sentence)
                    if min_chars <= len(sentence) <= max_chars and letters > 0.85 * len(sentence):
                        seen.setdefault(sentence)
    sentences = list(seen)
    random.Random(seed).shuffle(sentences)
    return sentences


def train_tokenizer(sentences: list[str], vocab_size: int, kind: str = "bpe"):
    """A ``PreTrainedTokenizerFast`` trained on ``sentences``.

    ``kind="bpe"``: byte-level BPE with ``<pad>``/``<eos>`` (for causal LMs). ``kind="wordpiece"``: lower-cased
    BERT-style WordPiece with ``[PAD] [UNK] [CLS] [SEP] [MASK]`` and ``[CLS] … [SEP]`` framing (for encoders).
    Ids are not those of any published vocabulary, and training is not reproducible across processes (the
    trainer breaks ties in hash order): save the tokenizer (``save_pretrained``) wherever ids must match later.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        special = ["<pad>", "<eos>"]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(sentences, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(sentences, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]",
        )
    raise ValueError(f"kind must be 'bpe' or 'wordpiece', got {kind!r}")
