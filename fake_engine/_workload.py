"""Workloads for ``python -m fake_engine simulate``: synthetic multi-turn chat, or a
Mooncake-format JSONL trace."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Union

Token = Union[int, bytes]

MOONCAKE_TOKENS_PER_HASH_ID = 512
VOCAB = 32000


@dataclass
class Request:
    """One request: a prompt and the tokens the fake model will generate for it."""

    rid: int
    prompt: list[Token]
    output: list[int]
    arrival: float = 0.0
    depends_on: int | None = None  # a request whose completion this one waits for
    session: int | None = None
    meta: dict[str, int] = field(default_factory=dict)


def _output_tokens(seed: int, rid: int, n: int) -> list[int]:
    rng = random.Random((seed << 32) ^ (rid * 0x9E3779B1))
    return [rng.randrange(VOCAB) for _ in range(n)]


def synthetic_workload(
    num_requests: int = 240,
    seed: int = 0,
    num_system_prompts: int = 8,
    system_prompt_len: tuple[int, int] = (256, 1024),
    user_len: tuple[int, int] = (16, 192),
    output_len: tuple[int, int] = (8, 48),
    turns: tuple[int, int] = (2, 6),
    concurrent_sessions: int = 24,
    multimodal_fraction: float = 0.1,
) -> list[Request]:
    """Multi-turn conversations over a few shared system prompts.

    Each turn's prompt is the previous turn's prompt + its output + new user
    tokens, so most of every prompt is a reusable prefix.  A turn depends on
    the previous turn of its session (it is only admitted once that completed).
    Some user messages start with a multimodal item (a 32-byte digest token
    followed by placeholder tokens) to exercise ``bytes`` tokens.
    """
    rng = random.Random(seed)
    systems: list[list[Token]] = [
        [rng.randrange(VOCAB) for _ in range(rng.randint(*system_prompt_len))] for _ in range(num_system_prompts)
    ]

    def user_message() -> list[Token]:
        msg: list[Token] = []
        if rng.random() < multimodal_fraction:
            msg.append(rng.randbytes(32))
            msg.extend([VOCAB + 1] * rng.randint(16, 64))  # image placeholder tokens
        msg.extend(rng.randrange(VOCAB) for _ in range(rng.randint(*user_len)))
        return msg

    # sessions: [system id, turns left, last prompt, last output, last rid]
    requests: list[Request] = []
    active: list[tuple[int, int, list[Token], list[int], int | None]] = []
    session_id = 0
    sessions_of: list[int] = []
    while len(requests) < num_requests:
        while len(active) < concurrent_sessions:
            sys_id = rng.randrange(num_system_prompts)
            active.append((sys_id, rng.randint(*turns), list(systems[sys_id]), [], None))
            sessions_of.append(session_id)
            session_id += 1
        k = rng.randrange(len(active))
        sys_id, left, prev_prompt, prev_out, prev_rid = active[k]
        sess = sessions_of[k]
        prompt = prev_prompt + list(prev_out) + user_message()
        rid = len(requests)
        out = _output_tokens(seed, rid, rng.randint(*output_len))
        requests.append(Request(rid, prompt, out, float(rid), prev_rid, sess, {"system": sys_id}))
        if left <= 1:
            active.pop(k)
            sessions_of.pop(k)
        else:
            active[k] = (sys_id, left - 1, prompt, out, rid)
    return requests


def _hash_block(h: int, n: int) -> list[Token]:
    return [(h * 1_000_003 + i) % 2**31 for i in range(n)]


def mooncake_trace(
    path: str, num_requests: int | None = None, scale: int = 16, seed: int = 0
) -> list[Request]:
    """Requests of a Mooncake JSONL trace (``timestamp, input_length, output_length,
    hash_ids``; 512 tokens per hash id).  ``scale`` divides every length (tokens per
    hash id included) so the trace fits a small demo; block contents stay a
    deterministic function of the hash id, so shared hash ids share prefixes."""
    if scale < 1:
        raise ValueError("scale must be >= 1")
    per_id = max(1, MOONCAKE_TOKENS_PER_HASH_ID // scale)
    blocks: dict[int, list[Token]] = {}
    out: list[Request] = []
    for rid, rec in enumerate(_read_jsonl(path)):
        if num_requests is not None and rid >= num_requests:
            break
        n_in = max(1, int(rec["input_length"]) // scale)
        n_out = max(1, int(rec["output_length"]) // scale)
        prompt: list[Token] = []
        for h in rec.get("hash_ids", []):
            blk = blocks.get(h)
            if blk is None:
                blk = blocks[h] = _hash_block(int(h), per_id)
            prompt.extend(blk)
            if len(prompt) >= n_in:
                break
        if len(prompt) < n_in:  # trace lengths beyond its hash ids: unique filler
            prompt.extend(_output_tokens(seed + 1, rid, n_in - len(prompt)))
        del prompt[n_in:]
        out.append(Request(rid, prompt, _output_tokens(seed, rid, n_out), float(rec.get("timestamp", rid))))
    return out


def _read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rec: Any = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}: not a JSON object per line")
                yield rec
