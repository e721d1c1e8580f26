"""A cache's committed tokens, stored without per-token Python objects."""

from __future__ import annotations

from typing import cast

from librt.vecs import append, vec
from mypy_extensions import i64

from ._block_radix_tree import BlockNode
from ._common import TOKEN_ID_LIMIT, TokenIdExt
from ._tokens import scan_tokens, unpack_block


class TokenStore:
    """A cache's committed tokens.

    The reused full blocks stay in the tree nodes they came from (`prefix`: their keys hold the
    tokens, so admission copies nothing); later tokens are ints in an unboxed vector, digests in
    a side list (stored as id -1-k).
    """

    def __init__(self, tokens_per_block: i64) -> None:
        self.tokens_per_block: i64 = tokens_per_block
        self.prefix: list[BlockNode] = []
        self.prefix_tokens: i64 = 0
        self.ids: vec[i64] = vec[i64]()
        self.extra: list[bytes] = []

    def count(self) -> i64:
        return self.prefix_tokens + len(self.ids)

    def set_prefix(self, nodes: list[BlockNode]) -> None:
        self.prefix = nodes
        self.prefix_tokens = len(nodes) * self.tokens_per_block

    def append(self, t: TokenIdExt) -> None:
        if isinstance(t, int):
            self.ids = append(self.ids, t)
        else:
            self.extra.append(t)
            self.ids = append(self.ids, -len(self.extra))

    def extend_checked(self, tokens: list[TokenIdExt], name: str) -> None:
        """Validates and appends every token; on a bad token raises with nothing appended."""
        ids = self.ids
        objs = cast("list[object]", tokens)  # no union check per read (see _tokens.py)
        n = len(objs)
        for i in range(n):
            o = objs[i]
            if type(o) is int:
                assert isinstance(o, int)
                t: int = o
                if 0 <= t < TOKEN_ID_LIMIT:
                    ids = append(ids, t)
                    continue
            # A digest or a bad token: validate everything first, then take the general path.
            all_int = scan_tokens(tokens, 0, n, name)
            self.extend(tokens, 0, n, all_int)
            return
        self.ids = ids

    def extend(self, tokens: list[TokenIdExt], beg: i64, end: i64, all_int: bool) -> None:
        """Appends tokens[beg:end] (validated already)."""
        ids = self.ids
        if all_int:
            for i in range(beg, end):
                t = tokens[i]
                assert isinstance(t, int)
                ids = append(ids, t)
            self.ids = ids
            return
        for i in range(beg, end):
            self.append(tokens[i])

    def has_bytes(self, beg: i64, end: i64) -> bool:
        """Whether tokens[beg:end] (beg past the prefix) hold a digest."""
        if len(self.extra) == 0:
            return False
        off = self.prefix_tokens
        for i in range(beg - off, end - off):
            if self.ids[i] < 0:
                return True
        return False

    def slice(self, beg: i64, end: i64) -> list[TokenIdExt]:
        out: list[TokenIdExt] = []
        tpb = self.tokens_per_block
        i = beg
        while i < end and i < self.prefix_tokens:
            node = self.prefix[i // tpb]
            toks = unpack_block(node.key[8:], node.num_tokens)
            j = i % tpb
            while j < tpb and i < end:
                out.append(toks[j])
                j += 1
                i += 1
        off = self.prefix_tokens
        while i < end:
            v = self.ids[i - off]
            if v >= 0:
                out.append(v)
            else:
                out.append(self.extra[-v - 1])
            i += 1
        return out

    def to_list(self) -> list[TokenIdExt]:
        return self.slice(0, self.count())
