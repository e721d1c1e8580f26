"""Token validation and packing.

Packing (ints as 4-byte little-endian, 32-byte digests raw) is what the SHA-256 chain hashes and
what the reuse tree's lookup keys hold. The loops here are written for mypyc: one pass over a
list of ints, writing straight into a reusable BytesWriter, no intermediate objects.
"""

from __future__ import annotations

from typing import Final, Sequence, cast

from librt.strings import BytesWriter, read_i32_le, write_i32_le
from librt.vecs import vec
from mypy_extensions import i32, i64

from ._common import BYTES_TOKEN_LEN, TOKEN_ID_LIMIT, TokenIdExt

# Marks a block holding at least one bytes token; followed by one kind byte per token so the
# lookup key of a mixed block never equals the key of an all-int block.
MIXED_MARK: Final = b"\xff"
_I32_WRAP: Final = 1 << 32
_I32_MAX: Final = (1 << 31) - 1


def check_token(t: object, name: str) -> None:
    """Raises unless t is an int in [0, 2**32) (bool is rejected) or exactly 32 bytes."""
    if type(t) is int:
        assert isinstance(t, int)
        if t < 0 or t >= TOKEN_ID_LIMIT:
            raise ValueError(f"{name}: token id {t} is outside [0, 2**32)")
    elif isinstance(t, bytes):
        if len(t) != BYTES_TOKEN_LEN:
            raise ValueError(f"{name}: a bytes token must be exactly 32 bytes, got {len(t)}")
    else:
        raise TypeError(f"{name}: a token must be an int or 32 bytes, got {type(t).__name__}")


# The per-token loops read the list as list[object]: indexing a list[int | bytes] makes compiled
# code check the union on every read, and the exact-type test comes next anyway. Each int is
# unboxed once into a typed local (`t: int = o`), then compared and converted unboxed (about a
# quarter fewer instructions per token than narrowing in place; callgrind, BENCHMARKS.md).


def scan_tokens(tokens: list[TokenIdExt], beg: i64, end: i64, name: str) -> bool:
    """Validates tokens[beg:end]; True when all are ints."""
    objs = cast("list[object]", tokens)
    all_int = True
    for i in range(beg, end):
        o = objs[i]
        if type(o) is int:
            assert isinstance(o, int)
            t: int = o
            if t < 0 or t >= TOKEN_ID_LIMIT:
                raise ValueError(f"{name}: token id {t} is outside [0, 2**32)")
        else:
            check_token(o, name)
            all_int = False
    return all_int


def as_token_list(tokens: object, name: str) -> list[TokenIdExt]:
    """The tokens as a list (no copy for a list); validation happens where they are read."""
    if isinstance(tokens, list):
        return tokens
    if isinstance(tokens, (str, bytes, bytearray)) or tokens is None:
        raise TypeError(f"{name} must be a sequence of tokens, got {type(tokens).__name__}")
    try:
        to_list = getattr(tokens, "tolist", None)
        return list(to_list() if to_list is not None else tokens)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of tokens, got {type(tokens).__name__}") from None


def validate_tokens(tokens: object, name: str) -> tuple[list[TokenIdExt], bool]:
    """Checks every token. Returns the tokens as a list and whether all of them are ints."""
    seq = as_token_list(tokens, name)
    return seq, scan_tokens(seq, 0, len(seq), name)


def write_int_ids(w: BytesWriter, ids: vec[i64], beg: i64, end: i64) -> None:
    for i in range(beg, end):
        v = ids[i]
        if v > _I32_MAX:
            v -= _I32_WRAP
        write_i32_le(w, i32(v))


def pack_block(tokens: Sequence[TokenIdExt]) -> bytes:
    """Lookup bytes of one block's tokens (validated already), for blocks that may hold digests."""
    body = bytearray()
    kinds = bytearray()
    mixed = False
    for t in tokens:
        if isinstance(t, int):
            body += t.to_bytes(4, "little")
            kinds.append(0)
        else:
            body += t
            kinds.append(1)
            mixed = True
    if not mixed:
        return bytes(body)
    return bytes(body) + MIXED_MARK + bytes(kinds)


def token_bytes_of_key(block: bytes, num_tokens: i64) -> bytes:
    """The chain-hash bytes of a block's lookup bytes (drops the mixed-kind suffix)."""
    if len(block) == 4 * num_tokens:
        return block
    return block[: len(block) - num_tokens - 1]


def first_int_token(key: bytes, num_tokens: i64) -> i64:
    """First token of a lookup key (8-byte parent id + block) when the block holds only ints, else -1."""
    if len(key) != 8 + 4 * num_tokens or num_tokens == 0:
        return -1
    v: i64 = i64(read_i32_le(key, 8))
    return v + _I32_WRAP if v < 0 else v


def unpack_block(block: bytes, num_tokens: i64) -> list[TokenIdExt]:
    out: list[TokenIdExt] = []
    if len(block) == 4 * num_tokens:
        for i in range(num_tokens):
            r: i64 = i64(read_i32_le(block, 4 * i))
            out.append(r + _I32_WRAP if r < 0 else r)
        return out
    kinds = block[len(block) - num_tokens :]
    off = 0
    for k in kinds:
        if k == 0:
            out.append(int.from_bytes(block[off : off + 4], "little"))
            off += 4
        else:
            out.append(block[off : off + BYTES_TOKEN_LEN])
            off += BYTES_TOKEN_LEN
    return out
