"""The debug invariant checker behind `KVCacheManager.check_invariants()`."""

from __future__ import annotations

from .._block_radix_tree import BlockNode
from .._page import NIL
from .._storage_manager import LEVEL_LOST
from ._context import CacheContext
from ._kv_cache import ACTIVE, CLOSED


def _fail(msg: str) -> None:
    raise AssertionError(f"invariant broken: {msg}")


def check_manager(ctx: CacheContext) -> None:
    storage = ctx.storage
    pages = storage.pages
    tree = ctx.tree
    g = ctx.num_groups
    npg = storage.num_pool_groups
    n_pages = len(pages.level)

    # Slots: each used slot maps to a live page placed there; free slots hold nothing; no duplicates.
    used_slots = 0
    for level in range(storage.num_levels):
        for pg in range(npg):
            alloc = storage.allocator(level, pg)
            free = list(alloc.free)
            if len(set(free)) != len(free):
                _fail(f"level {level} pool group {pg}: a slot is free twice")
            for s in free:
                if alloc.slot_page[s] != NIL:
                    _fail(f"level {level} pool group {pg}: free slot {s} still maps page {alloc.slot_page[s]}")
            for s in range(alloc.num_slots):
                p = alloc.slot_page[s]
                if p == NIL:
                    continue
                used_slots += 1
                if not 0 <= p < n_pages or pages.level[p] != level or pages.slot[p] != s or pages.pool_group[p] != pg:
                    _fail(f"level {level} pool group {pg}: slot {s} maps page {p} which is placed elsewhere")
            if len(free) + sum(1 for s in range(alloc.num_slots) if alloc.slot_page[s] != NIL) != alloc.num_slots:
                _fail(f"level {level} pool group {pg}: free + used != total")
    lost_count = sum(1 for p in range(n_pages) if pages.level[p] == LEVEL_LOST)
    if used_slots != pages.num_live - lost_count:
        _fail(f"{pages.num_live} live pages ({lost_count} lost) but {used_slots} used slots")

    # Expected references from open caches.
    locks = [0] * n_pages
    holds = [0] * n_pages
    for kv in ctx.open_caches.values():
        if kv._status == CLOSED:
            _fail(f"closed cache {kv.id!r} is still registered as open")
        nc = kv._tokens.count()
        if not nc <= kv._history <= kv._capacity:
            _fail(f"cache {kv.id!r}: committed {nc} <= history {kv._history} <= capacity {kv._capacity} broken")
        nb = kv.num_blocks
        for lg in range(g):
            pl = kv._pages[lg]
            if len(pl) != nb:
                _fail(f"cache {kv.id!r} group {lg}: {len(pl)} page entries for {nb} blocks")
            lc = ctx.life_cycles[lg]
            s = lc.stale_beg(kv._history)
            e = lc.stale_end(kv._history)
            # Scratch blocks (and former ones, not stale yet) have no page; never sink blocks.
            hwm = kv._scr_hwm[lg]
            sb = kv._scr_beg[lg]
            se = kv._scr_end[lg]
            if se > sb and sb < lc.sink_blocks:
                _fail(f"cache {kv.id!r} group {lg}: scratch range [{sb}, {se}) covers a sink block")
            if len(kv._scr_pages[lg]) != 0:
                if kv._status != ACTIVE:
                    _fail(f"suspended cache {kv.id!r} group {lg} still has scratch slots")
                want_slots = ctx.layout.layer_groups[lg].scratch_slots(se - sb)
                if len(kv._scr_pages[lg]) != want_slots:
                    _fail(f"cache {kv.id!r} group {lg}: {len(kv._scr_pages[lg])} scratch slots for {se - sb} blocks, want {want_slots}")
                for p in kv._scr_pages[lg]:
                    if not pages.is_live(p) or pages.level[p] != 0 or pages.node[p] != NIL or pages.layer_group[p] != lg:
                        _fail(f"cache {kv.id!r} group {lg}: scratch page {p} is not a private level-0 page")
                    locks[p] += 1
            elif kv._status == ACTIVE and se > sb:
                _fail(f"active cache {kv.id!r} group {lg}: scratch range [{sb}, {se}) without slots")
            for b in range(nb):
                p = pl[b]
                stale = s <= b < e
                if stale and p != NIL:
                    _fail(f"cache {kv.id!r} group {lg}: stale block {b} still has page {p}")
                if sb <= b < se and p != NIL:
                    _fail(f"cache {kv.id!r} group {lg}: scratch block {b} has page {p}")
                if not stale and p == NIL and not (lc.sink_blocks <= b < hwm):
                    _fail(f"cache {kv.id!r} group {lg}: block {b} has no page")
                if p == NIL:
                    continue
                if not pages.is_live(p):
                    _fail(f"cache {kv.id!r} group {lg}: block {b} refers to freed page {p}")
                if pages.level[p] == LEVEL_LOST and not kv._lost_data and kv._status == ACTIVE:
                    _fail(f"active cache {kv.id!r} uses lost page {p}")
                if pages.layer_group[p] != lg:
                    _fail(f"cache {kv.id!r} group {lg}: page {p} belongs to group {pages.layer_group[p]}")
                if kv._status == ACTIVE:
                    if pages.level[p] != 0:
                        _fail(f"active cache {kv.id!r}: page {p} is not on level 0")
                    locks[p] += 1
                else:
                    holds[p] += 1
    for p in range(n_pages):
        if not pages.is_live(p):
            if locks[p] or holds[p]:
                _fail(f"freed page {p} is still referenced")
            continue
        if pages.pinned[p] != 0:
            _fail(f"page {p} is still pinned between calls")
        if pages.level[p] == LEVEL_LOST:
            if locks[p] + holds[p] == 0 or pages.node[p] != NIL or pages.listed[p]:
                _fail(f"lost page {p} must be held by a cache, outside the tree and unlisted")
            continue
        if pages.locks[p] != locks[p] or pages.holds[p] != holds[p]:
            _fail(
                f"page {p}: locks/holds {pages.locks[p]}/{pages.holds[p]} but caches account for {locks[p]}/{holds[p]}"
            )
        unref = locks[p] == 0 and holds[p] == 0
        if unref and pages.node[p] == NIL:
            _fail(f"page {p} is referenced by nobody and not in the tree (leak)")
        want = pages.locks[p] == 0 and (
            (pages.holds[p] == 0 and pages.node[p] != NIL) or (pages.holds[p] > 0 and pages.level[p] < storage.last_level)
        )
        if bool(pages.listed[p]) != want:
            _fail(f"page {p}: evictable-list membership {pages.listed[p]} does not match its state")
        nid = pages.node[p]
        if nid != NIL:
            node = tree.nodes[nid] if 0 <= nid < len(tree.nodes) else None
            if node is None or tree.page_of(node, pages.layer_group[p]) != p:
                _fail(f"page {p} claims tree node {nid} which does not hold it")

    # Evictable lists: walk each one, counts match.
    for level in range(storage.num_levels):
        for pg in range(npg):
            count = 0
            for prio in range(101):
                li = (level * npg + pg) * 101 + prio
                p = pages.heads[li]
                prev = NIL
                while p != NIL:
                    if pages.prev[p] != prev or not pages.listed[p] or pages.priority[p] != prio:
                        _fail(f"evictable list {level}/{pg}/{prio} is corrupt at page {p}")
                    count += 1
                    prev = p
                    p = pages.next[p]
                if pages.tails[li] != prev:
                    _fail(f"evictable list {level}/{pg}/{prio}: tail mismatch")
            held = sum(1 for p in range(n_pages) if pages.listed[p] and pages.level[p] == level and pages.pool_group[p] == pg and pages.holds[p] > 0)
            if held != pages.held_evictable_count(level, pg):
                _fail(f"level {level} pool group {pg}: held-listed counter is wrong")
            if count != pages.evictable_count(level, pg):
                _fail(f"level {level} pool group {pg}: {count} listed pages, counter says {pages.evictable_count(level, pg)}")

    # Tree: nodes, keys, children and page back-references agree.
    live = 0
    for nid, node in enumerate(tree.nodes):
        if node is None:
            continue
        live += 1
        if node.node_id != nid or not node.alive:
            _fail(f"tree node {nid} has a wrong id or is dead")
        if node.parent is not None:
            if node.bucket != tree.bucket_of(node.parent, node.key):
                _fail(f"tree node {nid} is filed under a wrong bucket")
            if tree.find_child(node.parent, node.key) is not node:
                _fail(f"tree node {nid} is not reachable by its key")
            if not node.parent.alive:
                _fail(f"tree node {nid} has a dead parent")
            if node.num_tokens > ctx.tokens_per_block or node.num_tokens <= 0:
                _fail(f"tree node {nid} holds {node.num_tokens} tokens")
            if node.parent.num_tokens != ctx.tokens_per_block and node.parent.parent is not None:
                _fail(f"tree node {nid} hangs below a partial block")
        for lg in range(g):
            p = tree.page_of(node, lg)
            if p != NIL and (not pages.is_live(p) or pages.node[p] != nid or pages.layer_group[p] != lg):
                _fail(f"tree node {nid} group {lg}: page {p} does not point back")
        c = node.first_child
        prev_c: BlockNode | None = None
        while c is not None:
            if c.parent is not node or c.prev_sibling is not prev_c:
                _fail(f"tree node {nid}: child list is corrupt")
            prev_c = c
            c = c.next_sibling
    keyed = 0
    for head in tree.children.values():
        m: BlockNode | None = head
        while m is not None:
            if not m.alive or tree.children.get(m.bucket) is not head:
                _fail(f"bucket chain of node {m.node_id} is corrupt")
            keyed += 1
            m = m.next_in_bucket
    if keyed != live - len(tree.roots):
        _fail(f"{keyed} keyed children but {live - len(tree.roots)} non-root nodes")

    if not ctx.open_caches and not tree.children:
        for level in range(storage.num_levels):
            for pg in range(npg):
                if storage.num_free(level, pg) != storage.num_slots(level, pg):
                    _fail(f"no caches and an empty tree, but level {level} pool group {pg} has used slots")
