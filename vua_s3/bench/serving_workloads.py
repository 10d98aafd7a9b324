"""The prompts of ``vua-s3 bench-vllm``: random token ids, so nothing is downloaded, and every
prompt set seeded, so each repeat meets prefixes no earlier repeat sent.

* ``regular``: the workload as asked (``documents``: shared documents, distinct questions,
  shuffled; ``chat``: each document opens a conversation of several rounds);
* ``same_prefix``: one wave per document, ``concurrency`` sessions at once on it (documents:
  one question each; chat: a conversation each): many clients meeting one new prefix together;
* ``hot``: every prompt starts with one system prompt, then goes on with its own text (a
  whole group of its own, so each request has something to look up past the shared part).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from ..config import DEFAULT_SPLIT_FACTOR
from .random_llama import VOCAB
from .serving import Session, Workload


@dataclass(frozen=True)
class PromptShape:
    """What the prompts look like (the bench's options, less the server's)."""

    workload: str = "documents"
    docs: int = 4
    doc_tokens: int = 1024
    questions: int = 4
    """Questions per document, or rounds per conversation."""
    question_tokens: int = 32
    reply_tokens: int = 16
    """A chat round's stand-in reply (the prefix is what matters, not its text)."""
    concurrency: int = 4
    split_factor: int = DEFAULT_SPLIT_FACTOR


class _Tokens:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def __call__(self, n: int) -> list[int]:
        return [self.rng.randrange(3, VOCAB) for _ in range(n)]


def _check(shape: PromptShape) -> None:
    if shape.workload not in ("documents", "chat"):
        raise ValueError(f"unknown workload {shape.workload!r}: documents or chat")


def _conversation(tokens: _Tokens, opening: list[int], shape: PromptShape) -> Session:
    """Rounds in turn: each the previous prompt, a stand-in reply and a new turn."""
    rounds, history = [], opening
    for _ in range(shape.questions):
        rounds.append(history + tokens(shape.question_tokens))
        history = rounds[-1] + tokens(shape.reply_tokens)
    return rounds


def regular(shape: PromptShape, seed: int) -> Workload:
    """Prompt set ``seed`` of the workload: one wave of every session."""
    _check(shape)
    tokens = _Tokens(seed)
    docs = [tokens(shape.doc_tokens) for _ in range(shape.docs)]
    if shape.workload == "chat":
        return [[_conversation(tokens, doc, shape) for doc in docs]]
    sessions = [[d + tokens(shape.question_tokens)] for d in docs for _ in range(shape.questions)]
    tokens.rng.shuffle(sessions)
    return [sessions]


def same_prefix(shape: PromptShape, seed: int) -> Workload:
    """One wave per new document, ``concurrency`` sessions on it sent together."""
    _check(shape)
    tokens = _Tokens(1_000_000 + seed)
    waves = []
    for _ in range(shape.docs):
        doc = tokens(shape.doc_tokens)
        if shape.workload == "chat":
            waves.append([_conversation(tokens, doc, shape) for _ in range(shape.concurrency)])
        else:
            waves.append([[doc + tokens(shape.question_tokens)] for _ in range(shape.concurrency)])
    return waves


def hot(shape: PromptShape, seed: int) -> tuple[Workload, Workload]:
    """Prompt set ``seed`` with one system prompt (``doc_tokens``) before every prompt, each
    going on with a group of its own, and the workload that stores the system prompt alone."""
    _check(shape)
    system = _Tokens(2_000_000 + seed)(shape.doc_tokens)
    own = replace(shape, doc_tokens=shape.split_factor)
    if shape.workload == "documents":  # every request its own text: one question per opening
        own = replace(own, docs=shape.docs * shape.questions, questions=1)
    (sessions,) = regular(own, 3_000_000 + seed)
    prime = [[[system + _Tokens(4_000_000 + seed)(shape.question_tokens)]]]
    return [[[system + prompt for prompt in session] for session in sessions]], prime
