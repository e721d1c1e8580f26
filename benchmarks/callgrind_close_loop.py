"""Close-heavy serving loop (config B, 64 requests) for instruction counting:

    PYTHONPATH=build/compiled valgrind --tool=callgrind python benchmarks/callgrind_close_loop.py

Instruction counts are repeatable on a shared machine where timings drift."""
import sys, random
from kv_cache_manager_v2 import *
layers=[AttentionLayerConfig(0,[BufferConfig("k",512),BufferConfig("v",512)]),AttentionLayerConfig(1,[BufferConfig("k",512),BufferConfig("v",512)]),
        AttentionLayerConfig(2,[BufferConfig("k",512),BufferConfig("v",512)], sliding_window_size=512)]
cfg = KVCacheManagerConfig(tokens_per_block=16, cache_tiers=[GpuCacheTierConfig(quota=64<<20)], layers=layers, backend="host")
P=[list(range(1+i*2000, 1+i*2000+1024)) for i in range(8)]
prompts = [P[i%8] + list(range((1<<24)+i*300, (1<<24)+i*300+256)) for i in range(64)]
m = KVCacheManager(cfg)
kvs=[]
for p in prompts:
    kv = m.create_kv_cache(input_tokens=p); kv.resume(); kv.resize(capacity=len(p)); kv.commit(p[kv.num_committed_tokens:]); kvs.append(kv)
for s in range(16):
    for kv in kvs:
        kv.resize(capacity=kv.capacity+1); kv.commit([s])
for kv in kvs: kv.close()
