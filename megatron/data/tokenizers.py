"""Tokenizers chosen by Megatron's `--tokenizer-type` names.

All tokenization is done by the `sentencepiece` and `tokenizers` libraries; this module
only maps Megatron's flags and conventions onto them (which token is EOD, how the
vocabulary is counted and padded), so that token ids match what Megatron writes for
the same files. Every tokenizer has `tokenize(text) -> list[int]`,
`detokenize(ids) -> str`, `vocab_size`, `padded_vocab_size` and `eod`.

Nothing here downloads: HuggingFaceTokenizer loads a local `tokenizer.json` only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

from megatron.config import UserError

TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
)


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be built; the message names the flag to fix."""


def pad_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                   tensor_model_parallel_size: int = 1) -> int:
    """Megatron's padding: round up to a multiple of divisible_by * TP so that the
    embedding and output layers split evenly and hit fast GEMM shapes."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    if multiple <= 0:
        raise TokenizerError(f"--make-vocab-size-divisible-by must be positive, got {make_vocab_size_divisible_by}")
    return -(-vocab_size // multiple) * multiple


class _Base:
    """Shared padding bookkeeping; subclasses set `_vocab_size` and `_eod`."""

    name = "base"

    def __init__(self, make_vocab_size_divisible_by: int, tensor_model_parallel_size: int) -> None:
        self._divisible_by = make_vocab_size_divisible_by
        self._tp = tensor_model_parallel_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab_size(self._vocab_size, self._divisible_by, self._tp)

    @property
    def eod(self) -> int:
        return self._eod

    eod_id = eod

    def __repr__(self) -> str:
        return f"{self.name}(vocab_size={self.vocab_size}, padded={self.padded_vocab_size}, eod={self.eod})"


def _need_file(path: str | None, flag: str, ttype: str, what: str) -> str:
    if path is None:
        raise TokenizerError(f"--tokenizer-type {ttype} needs {flag} ({what})")
    if not os.path.exists(path):
        raise TokenizerError(f"{flag} {path} does not exist ({what} for --tokenizer-type {ttype})")
    if os.path.isdir(path):
        raise TokenizerError(f"{flag} {path} is a directory; pass {what} inside it (for --tokenizer-type {ttype})")
    return str(path)


class GPT2BPETokenizer(_Base):
    """GPT-2 byte-level BPE from `vocab.json` + `merges.txt` (run by the `tokenizers` library).

    Like Megatron's, the text `<|endoftext|>` is not special inside a document: it is
    split into ordinary byte-level tokens, and EOD is only what `--append-eod` adds.
    """

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file, merge_file, make_vocab_size_divisible_by=128, tensor_model_parallel_size=1):
        super().__init__(make_vocab_size_divisible_by, tensor_model_parallel_size)
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab_file = _need_file(vocab_file, "--vocab-file", self.name, "the GPT-2 vocab.json")
        merge_file = _need_file(merge_file, "--merge-file", self.name, "the GPT-2 merges.txt")
        try:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
        except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise TokenizerError(f"--vocab-file {vocab_file} is not a GPT-2 vocab.json (a JSON object of token -> "
                                 f"id): {e}; pass the vocab.json that goes with --merge-file") from e
        if not isinstance(vocab, dict):
            raise TokenizerError(f"--vocab-file {vocab_file} holds a JSON {type(vocab).__name__}, not the "
                                 "{token: id} object of a GPT-2 vocab.json")
        try:
            tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        except Exception as e:  # the Rust side raises a generic Exception
            raise TokenizerError(f"--vocab-file {vocab_file} and --merge-file {merge_file} do not load as a GPT-2 "
                                 f"BPE tokenizer: {e}; check that --merge-file is the merges.txt that goes with "
                                 "the vocab") from e
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        if "<|endoftext|>" not in vocab:
            raise TokenizerError(f"--vocab-file {vocab_file} has no '<|endoftext|>' entry, which GPT-2 uses as EOD")
        self._eod = vocab["<|endoftext|>"]
        self._vocab_size = len(vocab)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=False)


class GPTSentencePieceTokenizer(_Base):
    """A SentencePiece model used as is: EOD is the model's `</s>` (eos) id."""

    name = "GPTSentencePieceTokenizer"

    def __init__(self, tokenizer_model, make_vocab_size_divisible_by=128, tensor_model_parallel_size=1):
        super().__init__(make_vocab_size_divisible_by, tensor_model_parallel_size)
        import sentencepiece as spm

        path = _need_file(tokenizer_model, "--tokenizer-model", self.name, "a SentencePiece .model file")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"--tokenizer-model {path} is not a SentencePiece model: {e}") from e
        self._vocab_size = self._sp.get_piece_size()
        self._eod = self._sp.eos_id()
        if self._eod < 0 and self.name == "GPTSentencePieceTokenizer":
            raise TokenizerError(f"--tokenizer-model {path} was trained without an eos piece, which is EOD here")

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(map(int, ids)))


class SentencePieceTokenizer(GPTSentencePieceTokenizer):
    """Megatron's `SentencePieceTokenizer`: the model plus Megatron's special tokens.

    `<CLS> <SEP> <EOD> <MASK>`, the pad/bos/eos pieces (`<PAD>`/`<BOS>`/`<EOS>` when the
    model has none) and `vocab_extra_ids` `<extra_id_i>` tokens are appended after the
    model's pieces when missing, in that order, so ids equal Megatron's. EOD is `<EOD>`.
    Special-token strings found in a text are encoded as their ids. Unlike Megatron's,
    detokenize inserts no spaces around them, so detokenize(tokenize(t)) == t.
    """

    name = "SentencePieceTokenizer"

    def __init__(self, tokenizer_model, vocab_extra_ids=0, make_vocab_size_divisible_by=128,
                 tensor_model_parallel_size=1):
        super().__init__(tokenizer_model, make_vocab_size_divisible_by, tensor_model_parallel_size)
        sp = self._sp
        n = sp.get_piece_size()
        vocab = {sp.id_to_piece(i): i for i in range(n)}
        self._special: dict[str, int] = {}

        def add(token: str) -> None:
            if token not in vocab:
                vocab[token] = len(vocab)
            self._special[token] = vocab[token]

        for t in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
            add(t)
        for getter, fallback in ((sp.pad_id, "<PAD>"), (sp.bos_id, "<BOS>"), (sp.eos_id, "<EOS>")):
            i = getter()
            add(sp.id_to_piece(i) if 0 <= i < n else fallback)
        for i in range(vocab_extra_ids):
            add(f"<extra_id_{i}>")
        self._inv_special = {i: t for t, i in self._special.items()}
        self._vocab_size = len(vocab)
        self._eod = self._special["<EOD>"]
        # Longest first so that a special which is a prefix of another never wins.
        alternatives = sorted(self._special, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self._split_re.split(text)):
            if i % 2:  # odd parts are the captured special tokens
                ids.append(self._special[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        out, run = [], []
        for i in map(int, ids):
            if i in self._inv_special:
                out.append(self._sp.decode(run))
                out.append(self._inv_special[i])
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)


_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<EOD>")


class HuggingFaceTokenizer(_Base):
    """A local Hugging Face `tokenizer.json` (a file, or a directory that holds one).

    EOD is the `eos_token` of a `tokenizer_config.json` / `special_tokens_map.json`
    next to it, else the first of the usual end-of-text tokens the vocabulary has.
    The tokenizer's post-processing template (e.g. Llama's BOS) is not applied, so that
    documents are delimited only by `--append-eod` and texts round-trip exactly; note
    that Megatron-LM's transformers-based HuggingFaceTokenizer does apply it.
    """

    name = "HuggingFaceTokenizer"

    def __init__(self, tokenizer_model, make_vocab_size_divisible_by=128, tensor_model_parallel_size=1):
        super().__init__(make_vocab_size_divisible_by, tensor_model_parallel_size)
        from tokenizers import Tokenizer

        if tokenizer_model is None:
            raise TokenizerError(f"--tokenizer-type {self.name} needs --tokenizer-model (a local tokenizer.json or its directory)")
        path = str(tokenizer_model)
        if os.path.isdir(path):
            folder, path = path, os.path.join(path, "tokenizer.json")
        else:
            folder = os.path.dirname(path)
        if not os.path.isfile(path):
            raise TokenizerError(
                f"--tokenizer-model {tokenizer_model}: no tokenizer.json there. Only local files are loaded "
                "(no hub downloads): save the tokenizer with tokenizer.save('tokenizer.json') and pass its path"
            )
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a generic Exception
            raise TokenizerError(f"--tokenizer-model {path} is not a valid tokenizer.json: {e}") from e
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = self._configured_eos(folder)
        if eos is None:
            eos = next((t for t in _EOS_CANDIDATES if t in vocab), None)
        if eos is None or eos not in vocab:
            raise TokenizerError(
                f"--tokenizer-model {path}: cannot tell the end-of-document token; add one of "
                f"{list(_EOS_CANDIDATES)} or set eos_token in a tokenizer_config.json next to it"
            )
        self._eod = vocab[eos]

    @staticmethod
    def _configured_eos(folder: str) -> str | None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                with open(p, encoding="utf-8") as f:
                    eos = json.load(f).get("eos_token")
                if isinstance(eos, dict):
                    eos = eos.get("content")
                if isinstance(eos, str):
                    return eos
        return None

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=False)


class NullTokenizer(_Base):
    """Ids written as text ("12 7 33"), for synthetic data: Megatron's NullTokenizer.

    `--vocab-size V` allows ids 0..V-1 in the text; EOD is V, so `vocab_size` is V + 1.
    """

    name = "NullTokenizer"

    def __init__(self, vocab_size, make_vocab_size_divisible_by=128, tensor_model_parallel_size=1):
        super().__init__(make_vocab_size_divisible_by, tensor_model_parallel_size)
        if vocab_size is None or int(vocab_size) <= 0:
            raise TokenizerError(f"--tokenizer-type {self.name} needs a positive --vocab-size, got {vocab_size}")
        self._n = int(vocab_size)
        self._vocab_size = self._n + 1
        self._eod = self._n

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(t) for t in text.split()]
        except ValueError as e:
            raise ValueError(f"NullTokenizer reads whitespace-separated integer ids: {e}") from e
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            raise ValueError(f"NullTokenizer ids must be in [0, {self._vocab_size}), got [{min(ids)}, {max(ids)}]")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(tokenizer_type, *, vocab_file=None, merge_file=None, tokenizer_model=None,
                    vocab_size=None, make_vocab_size_divisible_by=128, tensor_model_parallel_size=1,
                    vocab_extra_ids=0):
    """Build the tokenizer named by Megatron's `--tokenizer-type`.

    `tokenizer_type` is the type name, or an object carrying Megatron's flag names as
    attributes (`tokenizer_type`, `vocab_file`, ...): a `megatron.config.DataConfig`, or an
    argparse namespace as upstream's `build_tokenizer(args)` takes; the keywords are then
    read from it.
    """
    if hasattr(tokenizer_type, "tokenizer_type"):
        return build_tokenizer_from_args(tokenizer_type)
    common = dict(make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                  tensor_model_parallel_size=tensor_model_parallel_size)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file, **common)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model, vocab_extra_ids=vocab_extra_ids, **common)
    if tokenizer_type == "GPTSentencePieceTokenizer":
        return GPTSentencePieceTokenizer(tokenizer_model, **common)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model, **common)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size, **common)
    raise TokenizerError(f"unknown --tokenizer-type {tokenizer_type!r}; valid names: {', '.join(TOKENIZER_TYPES)}")


def build_tokenizer_from_args(args):
    """Build from an object carrying Megatron's flag names (argparse namespace, DataConfig)."""
    return build_tokenizer(
        args.tokenizer_type,
        vocab_file=getattr(args, "vocab_file", None),
        merge_file=getattr(args, "merge_file", None),
        tokenizer_model=getattr(args, "tokenizer_model", None),
        vocab_size=getattr(args, "vocab_size", None),
        make_vocab_size_divisible_by=getattr(args, "make_vocab_size_divisible_by", 128),
        tensor_model_parallel_size=getattr(args, "tensor_model_parallel_size", 1) or 1,
        vocab_extra_ids=getattr(args, "vocab_extra_ids", 0) or 0,
    )


def add_tokenizer_args(parser) -> None:
    """The tokenizer flags of Megatron, for tools that parse their own command line."""
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model, or a local tokenizer.json (or its directory) for HuggingFaceTokenizer")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: number of ids")
    g.add_argument("--vocab-extra-ids", type=int, default=0, help="SentencePieceTokenizer: <extra_id_i> tokens")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)


__all__ = [
    "TOKENIZER_TYPES",
    "GPT2BPETokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "TokenizerError",
    "add_tokenizer_args",
    "build_tokenizer",
    "build_tokenizer_from_args",
    "pad_vocab_size",
]
