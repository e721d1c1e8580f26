"""Token validation and packing (ints as 4-byte little-endian, 32-byte digests raw)."""

from __future__ import annotations

from array import array
from typing import Final, Sequence

from librt.vecs import append, extend, vec
from mypy_extensions import i64

from ._common import BYTES_TOKEN_LEN, TOKEN_ID_LIMIT, TokenIdExt

assert array("I").itemsize == 4, "array('I') must be 4 bytes for token packing"

# Marks a block holding at least one bytes token; followed by one kind byte per token so the
# lookup key of a mixed block never equals the key of an all-int block.
MIXED_MARK: Final = b"\xff"


def check_token(t: object, name: str) -> None:
    if isinstance(t, bool) or not isinstance(t, (int, bytes)):
        raise TypeError(f"{name}: a token must be an int or 32 bytes, got {type(t).__name__}")
    if isinstance(t, int):
        if t < 0 or t >= TOKEN_ID_LIMIT:
            raise ValueError(f"{name}: token id {t} is outside [0, 2**32)")
    elif len(t) != BYTES_TOKEN_LEN:
        raise ValueError(f"{name}: a bytes token must be exactly 32 bytes, got {len(t)}")


def pack_all_ints(tokens: Sequence[TokenIdExt]) -> bytes | None:
    """Packs a token list that holds only valid ints; None if it holds anything else."""
    try:
        return array("I", tokens).tobytes()  # type: ignore[type-var, arg-type, unused-ignore]
    except (TypeError, OverflowError):
        return None


def validate_tokens(tokens: object, name: str) -> tuple[Sequence[TokenIdExt], bytes | None]:
    """Checks every token. Returns the tokens as a sequence and, when all are ints, their packing."""
    seq: Sequence[TokenIdExt]
    if isinstance(tokens, (list, tuple)):
        seq = tokens
    elif isinstance(tokens, (str, bytes, bytearray)) or tokens is None:
        raise TypeError(f"{name} must be a sequence of tokens, got {type(tokens).__name__}")
    else:
        try:
            to_list = getattr(tokens, "tolist", None)
            seq = list(to_list() if to_list is not None else tokens)  # type: ignore[arg-type, call-overload, unused-ignore]
        except TypeError:
            raise TypeError(f"{name} must be a sequence of tokens, got {type(tokens).__name__}") from None
    packed = pack_all_ints(seq)
    if packed is None:
        for t in seq:
            check_token(t, name)
    return seq, packed


def pack_block(tokens: Sequence[TokenIdExt]) -> bytes:
    """Lookup bytes of one block's tokens (validated already)."""
    packed = pack_all_ints(tokens)
    if packed is not None:
        return packed
    body = bytearray()
    kinds = bytearray()
    for t in tokens:
        if isinstance(t, int):
            body += t.to_bytes(4, "little")
            kinds.append(0)
        else:
            body += t
            kinds.append(1)
    return bytes(body) + MIXED_MARK + bytes(kinds)


def token_bytes_of_key(block: bytes, num_tokens: int) -> bytes:
    """The chain-hash bytes of a block's lookup bytes (drops the mixed-kind suffix)."""
    if len(block) == 4 * num_tokens:
        return block
    return block[: len(block) - num_tokens - 1]


def unpack_block(block: bytes, num_tokens: int) -> list[TokenIdExt]:
    out: list[TokenIdExt] = []
    if len(block) == 4 * num_tokens:
        a = array("I")
        a.frombytes(block)
        out.extend(a)
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


class TokenStore:
    """A cache's committed tokens: ints in an unboxed vector, digests in a side list (id -1-k)."""

    def __init__(self) -> None:
        self.ids: vec[i64] = vec[i64]()
        self.extra: list[bytes] = []

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, t: TokenIdExt) -> None:
        if isinstance(t, int):
            self.ids = append(self.ids, t)
        else:
            self.extra.append(t)
            self.ids = append(self.ids, -len(self.extra))

    def extend(self, tokens: Sequence[TokenIdExt], n: i64) -> None:
        """Appends tokens[:n] (validated already)."""
        if len(self.extra) == 0 and isinstance(tokens, list):
            try:
                self.ids = extend(self.ids, tokens[:n])  # type: ignore[arg-type, unused-ignore]
                return
            except TypeError:
                pass  # bytes tokens among them: take the general path
        for i in range(n):
            self.append(tokens[i])

    def get(self, i: i64) -> TokenIdExt:
        v = self.ids[i]
        if v >= 0:
            return v
        return self.extra[-v - 1]

    def slice(self, beg: i64, end: i64) -> list[TokenIdExt]:
        out: list[TokenIdExt] = []
        for i in range(beg, end):
            v = self.ids[i]
            if v >= 0:
                out.append(v)
            else:
                out.append(self.extra[-v - 1])
        return out

    def to_list(self) -> list[TokenIdExt]:
        return self.slice(0, len(self.ids))
