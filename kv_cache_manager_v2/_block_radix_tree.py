"""The reuse tree of committed blocks.

One node per committed block (shared by every layer group); a node's page per layer group
lives in one flat vector (`node_pages[node_id * G + lg]`), so a node costs one object plus its
key (`parent id (8 bytes) + packed block tokens`). Children are found through ONE dict keyed by
an int *bucket*, `parent id << 32 | first 4 bytes of the packed block` (the first token of an
all-int block); nodes sharing a bucket form a chain (`next_in_bucket`). Matching a block reads
its first token, probes the dict with an int, and compares the other tokens straight against
the candidate's key bytes: no key object is built and nothing is hashed while matching. The
SHA-256 chain key of a block (root = digest of the ReuseScope; key = SHA-256(parent key || token
bytes)) is computed lazily, only when something asks for it.
"""

from __future__ import annotations

import hashlib
from typing import Final, Sequence, cast

from librt.strings import BytesWriter, read_i32_le, write_i64_le
from librt.vecs import append, pop, vec
from mypy_extensions import i64

from ._common import TOKEN_ID_LIMIT, TokenIdExt, div_up
from ._config import ReuseScope
from ._life_cycle_registry import LifeCycle
from ._page import NIL
from ._storage_manager import StorageManager
from ._tokens import (
    check_token,
    first_int_token,
    pack_block,
    scan_tokens,
    token_bytes_of_key,
    unpack_block,
    write_int_ids,
)

SCOPE_DOMAIN: Final = b"kv_cache_manager_v2/ReuseScope/v1"
_U32: Final = 1 << 32
_I32_MAX: Final = (1 << 31) - 1


def _u32_at(key: bytes, offset: i64) -> i64:
    v: i64 = i64(read_i32_le(key, offset))
    return v + _U32 if v < 0 else v


def _in_chain(head: BlockNode | None, key: bytes) -> BlockNode | None:
    """The node of the bucket chain starting at `head` whose lookup key is `key`, if any."""
    c = head
    while c is not None and c.key != key:
        c = c.next_in_bucket
    return c


def scope_digest(lora_id: int, salt: int) -> bytes:
    """Root of the key chain: SHA-256 over a fixed domain and the scope's two fields (-1 = None)."""
    return hashlib.sha256(
        SCOPE_DOMAIN + lora_id.to_bytes(8, "little", signed=True) + salt.to_bytes(8, "little", signed=True)
    ).digest()


def scope_key(scope: ReuseScope | None) -> tuple[int, int]:
    if scope is None:
        return (-1, -1)
    return (
        scope.lora_id if scope.lora_id is not None else -1,
        scope.salt if scope.salt is not None else -1,
    )


class BlockNode:
    """A committed block. The root of a scope is a node with ordinal -1 and no tokens."""

    def __init__(self, node_id: i64, parent: BlockNode | None, key: bytes, num_tokens: i64, seq: i64) -> None:
        self.node_id: i64 = node_id
        self.parent: BlockNode | None = parent
        # parent id (8 bytes LE) + the block's packed tokens: the lookup key in the tree's dict.
        self.key: bytes = key
        self.num_tokens: i64 = num_tokens
        self.ordinal: i64 = -1 if parent is None else parent.ordinal + 1
        self.seq: i64 = seq
        self.first_child: BlockNode | None = None
        self.next_sibling: BlockNode | None = None
        self.prev_sibling: BlockNode | None = None
        self.sha: bytes | None = None
        self.alive: bool = True
        # First token when the block holds only ints (-1 otherwise): a cheap partial-match filter.
        self.first_token: i64 = first_int_token(key, num_tokens) if parent is not None else -1
        # The tree's dict key of this node (-1 for a root), and the next node with the same one.
        self.bucket: i64 = -1
        self.next_in_bucket: BlockNode | None = None

    @property
    def block_bytes(self) -> bytes:
        return self.key[8:]


class ReuseMatch:
    """Result of matching a prompt: `length` tokens reusable through `nodes` (one per block)."""

    def __init__(self, root: BlockNode | None, length: i64, nodes: list[BlockNode], partial: bool) -> None:
        self.root = root
        self.length: i64 = length
        self.nodes = nodes
        # The last block is only partly reused (copied on first resume).
        self.partial: bool = partial
        self.partial_from_partial_node: bool = False


class BlockRadixTree:
    def __init__(
        self,
        tokens_per_block: int,
        life_cycles: list[LifeCycle],
        storage: StorageManager,
        enable_partial_reuse: bool,
        reuse_match_backoff: int,
    ) -> None:
        self.tokens_per_block: i64 = tokens_per_block
        self.life_cycles = life_cycles
        self.num_groups: i64 = len(life_cycles)
        self.storage = storage
        self.enable_partial_reuse = enable_partial_reuse
        self.reuse_match_backoff: i64 = reuse_match_backoff
        # bucket -> first node of that bucket's chain (see the module docstring)
        self.children: dict[int, BlockNode] = {}
        self.nodes: list[BlockNode | None] = []
        self.free_node_ids: vec[i64] = vec[i64]()
        self.node_pages: vec[i64] = vec[i64]()
        self.roots: dict[tuple[int, int], BlockNode] = {}
        self.next_seq: i64 = 0
        self.writer = BytesWriter()
        self.full_groups: list[int] = [g for g, lc in enumerate(life_cycles) if not lc.is_windowed]
        self.swa_groups: list[int] = [g for g, lc in enumerate(life_cycles) if lc.is_windowed]
        storage.drop_hook = self.page_dropped

    # ---- nodes ------------------------------------------------------------------------------
    def _new_node(self, parent: BlockNode | None, key: bytes, num_tokens: i64) -> BlockNode:
        g = self.num_groups
        if len(self.free_node_ids) > 0:
            self.free_node_ids, nid = pop(self.free_node_ids)
        else:
            nid = len(self.nodes)
            self.nodes.append(None)
            for _ in range(g):
                self.node_pages = append(self.node_pages, NIL)
        node = BlockNode(nid, parent, key, num_tokens, self.next_seq)
        self.next_seq += 1
        self.nodes[nid] = node
        if parent is not None:
            first = parent.first_child
            node.next_sibling = first
            if first is not None:
                first.prev_sibling = node
            parent.first_child = node
        return node

    def _unlink_node(self, node: BlockNode) -> None:
        parent = node.parent
        if parent is not None:
            self._unbucket(node)
            if node.prev_sibling is None:
                parent.first_child = node.next_sibling
            else:
                node.prev_sibling.next_sibling = node.next_sibling
            if node.next_sibling is not None:
                node.next_sibling.prev_sibling = node.prev_sibling
        node.alive = False
        node.parent = None
        node.next_sibling = None
        node.prev_sibling = None
        base = node.node_id * self.num_groups
        for g in range(self.num_groups):
            self.node_pages[base + g] = NIL
        self.nodes[node.node_id] = None
        self.free_node_ids = append(self.free_node_ids, node.node_id)

    def _unbucket(self, node: BlockNode) -> None:
        head = self.children[node.bucket]
        if head is node:
            nxt = node.next_in_bucket
            if nxt is None:
                del self.children[node.bucket]
            else:
                self.children[node.bucket] = nxt
        else:
            prev = head
            while prev.next_in_bucket is not node:
                nx = prev.next_in_bucket
                assert nx is not None, "a node missing from its bucket chain"
                prev = nx
            prev.next_in_bucket = node.next_in_bucket
        node.next_in_bucket = None

    def bucket_of(self, parent: BlockNode, key: bytes) -> i64:
        """The dict key of the child of `parent` whose lookup key is `key`."""
        return (parent.node_id << 32) | _u32_at(key, 8)

    def find_child(self, parent: BlockNode, key: bytes) -> BlockNode | None:
        """The child of `parent` whose lookup key is `key`, if any."""
        return _in_chain(self.children.get(self.bucket_of(parent, key)), key)

    def root_for(self, scope: ReuseScope | None, create: bool) -> BlockNode | None:
        k = scope_key(scope)
        root = self.roots.get(k)
        if root is None and create:
            root = self._new_node(None, b"", 0)
            root.sha = scope_digest(k[0], k[1])
            self.roots[k] = root
        return root

    def child_key(self, parent: BlockNode, block: bytes) -> bytes:
        w = self.writer
        w.truncate(0)
        write_i64_le(w, parent.node_id)
        w.write(block)
        return w.getvalue()

    def match_child(self, parent: BlockNode, tokens: list[TokenIdExt], beg: i64, end: i64) -> BlockNode | None:
        """The child of `parent` holding exactly the full block tokens[beg:end]. Tokens read here
        are validated; on a miss the caller validates the rest (scan_tokens)."""
        objs = cast("list[object]", tokens)  # no union check per read (see _tokens.py)
        o = objs[beg]
        if type(o) is not int:
            return self._match_child_packed(parent, tokens, beg, end)
        assert isinstance(o, int)
        t0: int = o
        if t0 < 0 or t0 >= TOKEN_ID_LIMIT:
            raise ValueError(f"input_tokens: token id {t0} is outside [0, 2**32)")
        v0: i64 = t0
        c = self.children.get((parent.node_id << 32) | v0)
        want = 8 + 4 * (end - beg)
        while c is not None:
            key = c.key
            if len(key) == want:
                i = beg + 1
                off: i64 = 12
                while i < end:
                    o = objs[i]
                    if type(o) is not int:
                        return self._match_child_packed(parent, tokens, beg, end)
                    assert isinstance(o, int)
                    t: int = o
                    if t < 0 or t >= TOKEN_ID_LIMIT:
                        raise ValueError(f"input_tokens: token id {t} is outside [0, 2**32)")
                    v: i64 = t
                    if v > _I32_MAX:
                        v -= _U32  # the stored bytes read back as a signed 32-bit value
                    if i64(read_i32_le(key, off)) != v:
                        break
                    i += 1
                    off += 4
                if i == end:
                    return c
            elif c.num_tokens == end - beg:
                # A full block holding a digest starts like ours: compare packed keys instead.
                return self._match_child_packed(parent, tokens, beg, end)
            c = c.next_in_bucket
        return None

    def _match_child_packed(self, parent: BlockNode, tokens: list[TokenIdExt], beg: i64, end: i64) -> BlockNode | None:
        """match_child for a block holding a digest: validate, pack, compare whole keys."""
        for i in range(beg, end):
            check_token(tokens[i], "input_tokens")
        return self.find_child(parent, self.child_key(parent, pack_block(tokens[beg:end])))

    def ids_key(self, parent: BlockNode, ids: vec[i64], beg: i64, end: i64) -> bytes:
        w = self.writer
        w.truncate(0)
        write_i64_le(w, parent.node_id)
        write_int_ids(w, ids, beg, end)
        return w.getvalue()

    def page_of(self, node: BlockNode, lg: i64) -> i64:
        return self.node_pages[node.node_id * self.num_groups + lg]

    def node_of_page(self, p: i64) -> BlockNode | None:
        nid = self.storage.pages.node[p]
        if nid == NIL:
            return None
        return self.nodes[nid]

    def block_sha256(self, node: BlockNode) -> bytes:
        """The block's SHA-256 chain key, computed on first use and kept."""
        sha = node.sha
        if sha is not None:
            return sha
        chain: list[BlockNode] = []
        n: BlockNode | None = node
        while n is not None and n.sha is None:
            chain.append(n)
            n = n.parent
        assert n is not None, "a node without a root"
        prev = n.sha
        assert prev is not None
        for m in reversed(chain):
            prev = hashlib.sha256(prev + token_bytes_of_key(m.block_bytes, m.num_tokens)).digest()
            m.sha = prev
        return prev

    # ---- insertion ----------------------------------------------------------------------------
    def insert(self, parent: BlockNode, key: bytes, num_tokens: i64, cache_pages: list[vec[i64]], block: i64) -> BlockNode:
        """Publishes a committed block under `parent`, offering the committer's page of each
        group (`cache_pages[lg][block]`).

        If an identical block is already there, it is kept (the tree stores one copy); groups
        where it has no page adopt the committer's page. Returns the node that now stands for it.
        """
        bucket = self.bucket_of(parent, key)
        head = self.children.get(bucket)
        node = _in_chain(head, key)
        page_node = self.storage.pages.node
        if node is None:
            node = self._new_node(parent, key, num_tokens)
            node.bucket = bucket
            node.next_in_bucket = head
            self.children[bucket] = node
        base = node.node_id * self.num_groups
        for g in range(self.num_groups):
            p = cache_pages[g][block]
            if p != NIL and self.node_pages[base + g] == NIL and page_node[p] == NIL:
                self.node_pages[base + g] = p
                page_node[p] = node.node_id
        return node

    # ---- matching -------------------------------------------------------------------------
    def match(self, scope: ReuseScope | None, tokens: list[TokenIdExt]) -> tuple[ReuseMatch, bool]:
        """Longest reusable prefix of `tokens` (SPEC 4.3 gives the order of the rules). Validates
        every token on the way; also says whether all tokens are ints."""
        root = self.roots.get(scope_key(scope))
        n_tok: i64 = len(tokens)
        if root is None or n_tok == 0:
            return ReuseMatch(root, 0, [], False), scan_tokens(tokens, 0, n_tok, "input_tokens")
        tpb = self.tokens_per_block
        path: list[BlockNode] = []
        node = root
        nfull: i64 = 0
        while (nfull + 1) * tpb <= n_tok:
            beg = nfull * tpb
            child = self.match_child(node, tokens, beg, beg + tpb)
            if child is None:
                break
            path.append(child)
            node = child
            nfull += 1
        length = nfull * tpb
        # Tokens before `length` were validated while building keys; check the rest now.
        all_int = scan_tokens(tokens, length, n_tok, "input_tokens")
        if all_int and nfull > 0:
            all_int = not self._prefix_has_bytes(path)
        if self.enable_partial_reuse and length < n_tok and node.first_child is not None:
            best, partial_node = self._best_partial(node, tokens, length, min(n_tok, length + tpb))
            if partial_node is not None:
                path.append(partial_node)
                length += best
        # Backoff, then (without partial reuse) round down to a block.
        length = max(0, length - self.reuse_match_backoff)
        if not self.enable_partial_reuse:
            length = length // tpb * tpb
        length = self._servable_length(path, length)
        nb = div_up(length, tpb)
        return ReuseMatch(root, length, path[:nb], length % tpb != 0), all_int

    def _prefix_has_bytes(self, path: list[BlockNode]) -> bool:
        for node in path:
            if len(node.key) != 8 + 4 * node.num_tokens:
                return True
        return False

    def _best_partial(
        self, node: BlockNode, tokens: list[TokenIdExt], beg: i64, end: i64
    ) -> tuple[i64, BlockNode | None]:
        """The child sharing the longest token prefix with tokens[beg:end] (>= 1; ties: oldest)."""
        t0 = tokens[beg]
        want: i64 = t0 if isinstance(t0, int) else -1
        best: i64 = 0
        best_node: BlockNode | None = None
        rest: list[TokenIdExt] | None = None
        c = node.first_child
        while c is not None:
            if want < 0 or c.first_token < 0 or c.first_token == want:
                if rest is None:
                    rest = tokens[beg:end]
                common = _common_prefix(c, rest)
                if common > best or (common == best and common > 0 and best_node is not None and c.seq < best_node.seq):
                    best = common
                    best_node = c
            c = c.next_sibling
        return best, best_node

    def _has_page(self, node: BlockNode, lg: i64) -> bool:
        return self.node_pages[node.node_id * self.num_groups + lg] != NIL

    def _servable_length(self, path: list[BlockNode], length: i64) -> i64:
        """The longest length <= `length` that every layer group can serve from the tree."""
        tpb = self.tokens_per_block
        for lg in self.full_groups:
            nb = div_up(length, tpb)
            for b in range(nb):
                if not self._has_page(path[b], lg):
                    length = b * tpb
                    break
        while length > 0:
            if self._swa_servable(path, length):
                return length
            length = (div_up(length, tpb) - 1) * tpb
        return 0

    def _swa_servable(self, path: list[BlockNode], length: i64) -> bool:
        """Whether every windowed group has a page on its sink and window blocks at `length`."""
        nb = div_up(length, self.tokens_per_block)
        for lg in self.swa_groups:
            lc = self.life_cycles[lg]
            s = lc.stale_beg(length)
            e = lc.stale_end(length)
            for b in range(s):
                if not self._has_page(path[b], lg):
                    return False
            for b in range(e, nb):
                if not self._has_page(path[b], lg):
                    return False
        return True

    # ---- dropping and pruning -----------------------------------------------------------------
    def page_dropped(self, p: i64) -> None:
        """Storage drops page p: forget it; a full-attention loss prunes the subtree below."""
        pages = self.storage.pages
        node = self.nodes[pages.node[p]]
        assert node is not None
        lg = pages.layer_group[p]
        self.node_pages[node.node_id * self.num_groups + lg] = NIL
        pages.node[p] = NIL
        if not self.life_cycles[lg].is_windowed:
            self.remove_subtree(node)
        else:
            self._remove_if_useless(node)

    def _remove_if_useless(self, node: BlockNode) -> None:
        n: BlockNode | None = node
        while n is not None and n.parent is not None and n.first_child is None:
            base = n.node_id * self.num_groups
            for g in range(self.num_groups):
                if self.node_pages[base + g] != NIL:
                    return
            parent = n.parent
            self._unlink_node(n)
            n = parent

    def remove_subtree(self, top: BlockNode) -> None:
        """Removes `top` and everything below it. Unreferenced pages are dropped; pages still used
        by caches become private to them (they are freed when those caches release them)."""
        pages = self.storage.pages
        stack: list[BlockNode] = [top]
        order: list[BlockNode] = []
        while stack:
            n = stack.pop()
            order.append(n)
            c = n.first_child
            while c is not None:
                stack.append(c)
                c = c.next_sibling
        parent = top.parent
        for n in reversed(order):
            base = n.node_id * self.num_groups
            for g in range(self.num_groups):
                p = self.node_pages[base + g]
                if p == NIL:
                    continue
                self.node_pages[base + g] = NIL
                pages.node[p] = NIL
                if pages.locks[p] == 0 and pages.holds[p] == 0 and pages.pinned[p] == 0:
                    self.storage.drop(p)
                # Else a cache still uses it (it becomes private to that cache), or an eviction in
                # progress has it in hand and will drop or free it.
            if n.parent is not None:
                self._unlink_node(n)
        if parent is not None and parent.parent is not None:
            self._remove_if_useless(parent)

    def clear(self) -> None:
        """Forgets every block (caches must all be closed): every tree page is freed."""
        for root in list(self.roots.values()):
            self.remove_subtree(root)
            self._unlink_node(root)
        self.roots.clear()

    # ---- introspection ----------------------------------------------------------------------
    def live_nodes(self) -> list[BlockNode]:
        return [n for n in self.nodes if n is not None]

    def tokens_of(self, node: BlockNode) -> list[TokenIdExt]:
        return unpack_block(node.block_bytes, node.num_tokens)


def _common_prefix(node: BlockNode, rest: list[TokenIdExt]) -> i64:
    """Number of leading tokens of `rest` equal to the node's tokens."""
    theirs = unpack_block(node.block_bytes, node.num_tokens)
    n = min(len(theirs), len(rest))
    i = 0
    while i < n and theirs[i] == rest[i] and type(theirs[i]) is type(rest[i]):
        i += 1
    return i
