"""Long-context evaluation: loss by position over held-out long documents, and passkey retrieval.

Forward only, on one process or distributed with sequence parallelism: a sequence is sharded
over the SP ranks in the training layout (Ulysses, or the zigzag ring layout) and the model is
the training model (parallelized by `parallelize_gpt`, or the trainer's own for the periodic
hook), so every number is the one a single process would compute (tests: rel < 1e-5).

* Loss by position: for held-out documents of at least N + 1 tokens, the per-token loss of
  their first N predictions, averaged per position bucket (linear or log-spaced). A model that
  uses its context well has a falling curve; one that breaks beyond its trained context rises
  after it.
* Passkey retrieval: a number hidden at a chosen depth inside filler of a chosen length, then a
  question; scored teacher-forced on the answer tokens (correct when every answer token is
  the argmax; also the mean log-probability), accuracy over a grid of length x depth.

Tokens are scored by swapping the model's parameter-free loss module for `TokenScores` for the
duration of the evaluation (per token: negative log-likelihood and whether the label is the
argmax, over the true vocabulary, in tiles), so the forward goes through the model's own
`__call__`: SP input hooks, FSDP/DDP wrappers and attention backends behave as in training.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megatron.config import ConfigError
from megatron.core import comm
from megatron.core.sequence_parallel.layout import check_seq_len, sequence_shard_indices

# ------------------------------------------------------------------ scoring head


class TokenScores(nn.Module):
    """A stand-in for the loss module: per token `(nll, label is argmax)` as `[b, s, 2]` fp32.

    Logits are computed `tile_tokens` tokens at a time over the true vocabulary, so memory stays
    `[tile, V]` however long the shard is."""

    def __init__(self, tile_tokens: int = 1024) -> None:
        super().__init__()
        self.tile_tokens = tile_tokens

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                vocab_size: int | None = None) -> torch.Tensor:
        s, b, h = hidden.shape
        flat, targets = hidden.reshape(s * b, h), labels.t().reshape(s * b)  # [s b, h], [s b]
        out = torch.empty(s * b, 2, dtype=torch.float32, device=hidden.device)
        for i in range(0, s * b, self.tile_tokens):
            logits = F.linear(flat[i:i + self.tile_tokens], weight).float()  # [t, V padded]
            if vocab_size is not None:
                logits = logits[:, :vocab_size]
            target = targets[i:i + self.tile_tokens]
            out[i:i + self.tile_tokens, 0] = F.cross_entropy(logits, target, reduction="none")
            out[i:i + self.tile_tokens, 1] = (logits.argmax(dim=-1) == target).float()
        return out.view(s, b, 2).transpose(0, 1)  # [s, b, 2] -> [b, s, 2]


def _inner(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model.module, "loss") else model


@contextlib.contextmanager
def token_scoring(model: nn.Module, tile_tokens: int = 1024):
    """Within the block, `model(tokens, labels=...)` returns `[b, s, 2]` (nll, correct) per token."""
    inner = _inner(model)
    saved, was_training = inner.loss, model.training
    inner.loss = TokenScores(tile_tokens)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        inner.loss = saved
        model.train(was_training)


# ------------------------------------------------------------------ progress


class Progress:
    """A line every `every` seconds (and at the end) with done/total, elapsed time and an ETA; rank 0 only."""

    def __init__(self, what: str, total: int, enabled: bool = True, every: float = 10.0, stream=None) -> None:
        self.what, self.total, self.enabled, self.every = what, total, enabled, every
        self.stream = stream or sys.stderr
        self.start = self.last = time.perf_counter()
        self.done = 0

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.done == self.total):
            elapsed = now - self.start
            eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            print(f"[long-context eval] {self.what}: {self.done}/{self.total} ({elapsed:.1f} s, ETA {eta:.1f} s)",
                  file=self.stream, flush=True)
            self.last = now


# ------------------------------------------------------------------ the passkey task


FILLER_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO_TEXT = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
              "I will quiz you about the important information there. ")
NEEDLE_TEXT = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION_TEXT = "What is the pass key? The pass key is"


@dataclass
class PasskeyTask:
    """Builds passkey examples in token space.

    `intro + filler[:a] + needle(key) + filler[:b] + question + answer(key)`, the filler cut so
    the example has exactly `length + 1` tokens (the model sees `length`, the last answer token
    is the last label) and `a / (a + b)` is the depth. `filler(n, rng)` returns n filler tokens.
    """

    intro: list
    filler: object  # callable (n, rng) -> list of n token ids
    needle: object  # callable key -> token ids
    question: list
    answer: object  # callable key -> token ids
    keys: object  # callable rng -> key
    chance: float  # accuracy of guessing (for the report)
    name: str = "passkey"

    @classmethod
    def from_tokenizer(cls, tokenizer, digits: int = 5) -> PasskeyTask:
        """The usual text passkey (numbers of `digits` digits in repeated filler sentences)."""
        filler_ids = tokenizer.tokenize(FILLER_TEXT)

        def filler(n, rng):
            reps = -(-n // len(filler_ids))
            return (filler_ids * reps)[:n]

        return cls(intro=tokenizer.tokenize(INTRO_TEXT), filler=filler,
                   needle=lambda key: tokenizer.tokenize(" " + NEEDLE_TEXT.format(key=key)),
                   question=tokenizer.tokenize(" " + QUESTION_TEXT),
                   answer=lambda key: tokenizer.tokenize(f" {key}"),
                   keys=lambda rng: int(rng.integers(10 ** (digits - 1), 10 ** digits)),
                   chance=1.0 / (9 * 10 ** (digits - 1)), name="passkey (text)")

    @classmethod
    def synthetic(cls, marker: int, digits: tuple, filler: tuple, key_length: int = 1) -> PasskeyTask:
        """Token-level passkey for tiny models without a tokenizer: filler tokens drawn uniformly from
        `[filler[0], filler[1])`, a needle `[marker, d_1 .. d_k]` with digit tokens from `[digits[0],
        digits[1])` (which never occur in the filler, as numbers never occur in the text filler),
        the question `[marker]` and the answer `d_1 .. d_k`."""
        lo, hi = digits

        def draw_filler(n, rng):
            return rng.integers(filler[0], filler[1], size=n).tolist()

        return cls(intro=[], filler=draw_filler, needle=lambda key: [marker, *key], question=[marker],
                   answer=lambda key: list(key), keys=lambda rng: tuple(rng.integers(lo, hi, size=key_length).tolist()),
                   chance=(1.0 / (hi - lo)) ** key_length, name="passkey (synthetic tokens)")

    def example(self, length: int, depth: float, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(`length + 1` token ids, number of answer tokens at the end)."""
        key = self.keys(rng)
        needle, answer = self.needle(key), self.answer(key)
        room = length + 1 - len(self.intro) - len(needle) - len(self.question) - len(answer)
        if room < 0:
            raise ConfigError(f"passkey context length {length} is too short for the needle and question "
                              f"({length + 1 - room} tokens); use longer --passkey-lengths")
        before = int(round(depth * room))
        filler = self.filler(room, rng)
        ids = self.intro + filler[:before] + needle + filler[before:] + self.question + answer
        return np.asarray(ids, dtype=np.int64), len(answer)


# ------------------------------------------------------------------ the evaluator


@dataclass
class LongContextEvaluator:
    """Evaluate `model` (a GPTModel, plain or parallelized: SP, DDP/FSDP; called through `__call__`).

    With a `parallel_state`, sequences are sharded over its SP group and work items (documents,
    passkey trials) are split over its DP ranks; results are reduced over SP x DP, so every rank
    returns the same numbers."""

    model: nn.Module
    parallel_state: object = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tile_tokens: int = 1024
    show_progress: bool = True

    def __post_init__(self) -> None:
        ps = self.parallel_state
        self.sp = ps.sp_size if ps is not None else 1
        self.dp, self.dp_rank = (ps.dp_size, ps.dp_rank) if ps is not None else (1, 0)
        self.rank0 = ps is None or ps.rank == 0

    def _check_length(self, n: int) -> None:
        if self.parallel_state is not None and self.sp > 1:
            check_seq_len(n, self.sp, self.parallel_state.ring_size)

    def score(self, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For full sequences `[b, N + 1]`: (scores `[b, n, 2]` of this rank's tokens, their global positions `[n]`)."""
        tokens, labels = sequences[:, :-1], sequences[:, 1:]
        n = tokens.shape[1]
        positions = torch.arange(n)
        if self.parallel_state is not None and self.sp > 1:
            positions = sequence_shard_indices(n, self.parallel_state)
            tokens, labels = tokens[:, positions], labels[:, positions]
        out = self.model(tokens.to(self.device), labels=labels.to(self.device))
        return out, positions.to(self.device)

    def _rounds(self, items: int, batch_size: int):
        """This DP rank's item indices, `batch_size` per round; every rank runs the same number of rounds
        (an empty list: run a throwaway forward, FSDP's all-gathers need every rank)."""
        per_round = batch_size * self.dp
        for start in range(0, items, per_round):
            first = start + self.dp_rank * batch_size
            yield list(range(first, min(first + batch_size, items)))

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        ps = self.parallel_state
        if ps is not None and ps.sdp_size > 1:
            comm.all_reduce(t, group=ps.sdp_group, kind="all_reduce_eval")
        return t

    # -------------------------------------------------------------- loss by position

    def loss_by_position(self, documents: list, seq_length: int, num_buckets: int = 16, scale: str = "linear",
                         batch_size: int = 1) -> dict:
        """Mean loss per position bucket over `documents` (arrays of >= seq_length + 1 tokens)."""
        self._check_length(seq_length)
        docs = [np.asarray(d[:seq_length + 1], dtype=np.int64) for d in documents if len(d) >= seq_length + 1]
        if not docs:
            raise ConfigError(f"no document has {seq_length + 1} tokens or more: lower --seq-length or pass a "
                              f"data prefix with longer documents")
        edges = bucket_edges(seq_length, num_buckets, scale)
        bucket_of = torch.bucketize(torch.arange(seq_length), torch.tensor(edges[1:-1]), right=True).to(self.device)
        k = len(edges) - 1
        totals = torch.zeros(3, k, dtype=torch.float64, device=self.device)  # loss sum, correct sum, count
        progress = Progress(f"loss by position at {seq_length} tokens", len(docs), self.rank0 and self.show_progress)
        with token_scoring(self.model, self.tile_tokens):
            for rows in self._rounds(len(docs), batch_size):
                scores, positions = self.score(torch.from_numpy(np.stack([docs[r] for r in rows or [0]])))
                if not rows:  # a DP rank without work this round still joins the collectives (FSDP)
                    continue
                b = bucket_of[positions].repeat(scores.shape[0])  # [b n]
                flat = scores.reshape(-1, 2).double()
                totals[0].index_add_(0, b, flat[:, 0])
                totals[1].index_add_(0, b, flat[:, 1])
                totals[2].index_add_(0, b, torch.ones_like(flat[:, 0]))
                progress.step(len(rows) * self.dp)
        self._reduce(totals)
        sums, correct, counts = (totals[i].cpu().tolist() for i in range(3))
        return {"seq_length": seq_length, "documents": len(docs), "scale": scale, "bucket_edges": edges,
                "mean_loss": [s / c if c else float("nan") for s, c in zip(sums, counts)],
                "accuracy": [a / c if c else float("nan") for a, c in zip(correct, counts)],
                "tokens": [int(c) for c in counts], "overall_loss": sum(sums) / sum(counts)}

    # -------------------------------------------------------------- passkey retrieval

    def passkey(self, task: PasskeyTask, lengths: list, depths: list, trials: int = 10, seed: int = 0,
                batch_size: int = 1) -> dict:
        """Accuracy and mean answer log-probability for every (length, depth)."""
        for n in lengths:
            self._check_length(n)
        accuracy = np.zeros((len(lengths), len(depths)))
        logprob = np.zeros((len(lengths), len(depths)))
        cells = [(i, j) for i in range(len(lengths)) for j in range(len(depths))]
        progress = Progress("passkey retrieval", len(cells) * trials, self.rank0 and self.show_progress)
        with token_scoring(self.model, self.tile_tokens):
            for i, j in cells:
                rng = np.random.default_rng([seed, i, j])
                examples = [task.example(lengths[i], depths[j], rng) for _ in range(trials)]
                wrong = torch.zeros(trials, dtype=torch.float64, device=self.device)
                nll = torch.zeros(trials, dtype=torch.float64, device=self.device)
                for rows in self._rounds(trials, batch_size):
                    scores, positions = self.score(torch.from_numpy(np.stack([examples[r][0] for r in rows or [0]])))
                    if not rows:
                        continue
                    n_answer = torch.tensor([examples[r][1] for r in rows], device=self.device)
                    on_answer = (positions[None, :] >= lengths[i] - n_answer[:, None]).double()  # [b, n] mine
                    idx = torch.tensor(rows, device=self.device)
                    wrong.index_add_(0, idx, ((1 - scores[..., 1].double()) * on_answer).sum(1))
                    nll.index_add_(0, idx, (scores[..., 0].double() * on_answer).sum(1) / n_answer)
                    progress.step(len(rows) * self.dp)
                wrong, nll = self._reduce(torch.stack([wrong, nll]))
                accuracy[i, j] = float((wrong == 0).double().mean())
                logprob[i, j] = float(-nll.mean())
        return {"task": task.name, "lengths": list(lengths), "depths": list(depths), "trials": trials,
                "chance": task.chance, "accuracy": accuracy.tolist(), "answer_logprob": logprob.tolist(),
                "mean_accuracy": float(accuracy.mean())}


def bucket_edges(n: int, num_buckets: int, scale: str = "linear") -> list:
    """Bucket boundaries over positions [0, n): `num_buckets` equal ranges, or log-spaced (fine near the
    start, coarse at the end). Edges are ints, strictly increasing, from 0 to n."""
    if scale not in ("linear", "log"):
        raise ConfigError(f"--bucket-scale must be linear or log, got {scale!r}")
    k = max(1, min(num_buckets, n))
    if scale == "linear":
        edges = [round(i * n / k) for i in range(k + 1)]
    else:
        edges = [0] + [int(round(math.exp(math.log(n) * i / k))) for i in range(1, k + 1)]
    return sorted(set(edges))


# ------------------------------------------------------------------ data


def long_documents(prefix: str, min_tokens: int, count: int, from_end: bool = True) -> list:
    """Up to `count` documents of at least `min_tokens` tokens from a `.bin/.idx` prefix, taken from the end
    of the dataset by default (the part a `--split 969,30,1` run holds out)."""
    from megatron.data.indexed_dataset import MMapIndexedDataset  # noqa: PLC0415

    ds = MMapIndexedDataset(prefix)
    sizes = ds.sizes
    order = range(len(sizes) - 1, -1, -1) if from_end else range(len(sizes))
    picked = []
    for i in order:
        if sizes[i] >= min_tokens:
            picked.append(np.asarray(ds.get(i), dtype=np.int64))
            if len(picked) == count:
                break
    if not picked:
        raise ConfigError(f"{prefix}: no document has {min_tokens} tokens or more (longest: {int(sizes.max())}); "
                          f"lower the evaluation length or use a corpus with longer documents")
    return picked
