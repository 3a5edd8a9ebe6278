"""The training text and the tokenizer: a pinned dependency's own source code, and a byte-level BPE.

Corpus: every ``.py`` file of the installed ``networkx`` package (pinned in ``requirements.txt``, BSD-3-Clause
licence, written by its authors, not by us), without its ``tests`` folders, read in sorted path order.
Every install of this repository has the same files, so the corpus, its hash and the split are the same
on every machine. The validation set is the files whose path hashes to 0 modulo 10 (about a tenth),
so no file is split between the two sets.

Tokenizer: byte-level BPE trained with ``tokenizers`` on the training files only (a few seconds); its
merges are deterministic for a given corpus and vocabulary size.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import pathlib
from dataclasses import dataclass

import torch
from torch import Tensor

PACKAGE = "networkx"
PINNED = "3.6.1"
EOT = "<|endoftext|>"


@dataclass
class Corpus:
    """The files of the corpus, split by file: ``train`` and ``val`` map relative paths to their text."""

    train: dict[str, str]
    val: dict[str, str]
    version: str

    @property
    def n_bytes(self) -> int:
        return sum(len(t.encode()) for t in [*self.train.values(), *self.val.values()])

    def sha256(self) -> str:
        """A hash of every path and text in order: equal hashes mean the same corpus and split."""
        digest = hashlib.sha256()
        for name, part in (("train", self.train), ("val", self.val)):
            for path, text in part.items():
                digest.update(f"{name}:{path}\n".encode())
                digest.update(text.encode())
        return digest.hexdigest()

    def summary(self) -> str:
        return (f"{PACKAGE} {self.version}: {len(self.train)} train files, {len(self.val)} validation files, "
                f"{self.n_bytes / 1e6:.2f} MB, sha256 {self.sha256()[:16]}")


def is_validation(path: str) -> bool:
    """The split rule: a file is held out when the SHA-256 of its relative path is 0 modulo 10."""
    return int(hashlib.sha256(path.encode()).hexdigest(), 16) % 10 == 0


def load_corpus(package: str = PACKAGE) -> Corpus:
    """Read the package's ``.py`` files (``tests`` folders excluded) and split them by file.

    Raises:
        ValueError: if the package is missing or not the pinned version (the corpus would differ).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed: run `make install`")
    version = importlib.metadata.version(package)
    if package == PACKAGE and version != PINNED:
        raise ValueError(f"{package} is version {version}, the corpus is defined on {PINNED} (requirements.txt)")
    root = pathlib.Path(next(iter(spec.submodule_search_locations)))
    files = sorted(p for p in root.rglob("*.py") if "tests" not in p.relative_to(root).parts)
    train, val = {}, {}
    for p in files:
        rel = p.relative_to(root.parent).as_posix()
        (val if is_validation(rel) else train)[rel] = p.read_text(encoding="utf-8")
    return Corpus(train, val, version)


def train_tokenizer(texts, vocab_size: int = 2048):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (strings), with ``<|endoftext|>`` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def encode(tokenizer, texts) -> Tensor:
    """All ``texts`` as one long tensor of ids, each file followed by ``<|endoftext|>``."""
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def batches(ids: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """``(batch_size, seq_len)`` windows at random offsets of the token stream ``ids``."""
    starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=generator)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def val_windows(ids: Tensor, seq_len: int, n: int) -> Tensor:
    """``n`` fixed, evenly spaced validation windows ``(n, seq_len)`` (the same every evaluation)."""
    starts = torch.linspace(0, len(ids) - seq_len - 1, n).long()
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
