"""A probe, not a benchmark: the decode attention of one layer at batch 16 and a 2000-token context (Llama-3-8B
heads, bf16, the engine's paged pool): the block gather alone, SDPA with GQA, with the KV heads repeated, and with
the query heads grouped per KV head. Prints ms per layer.

    python benchmarks/attention_probe.py
"""
import torch, time
import torch.nn.functional as F
dev = "cuda"
B, H, KVH, D, W, bs = 16, 32, 8, 128, 128, 16
pool = torch.randn(4096, 32, 2, bs, KVH, D, device=dev, dtype=torch.bfloat16)
table = torch.randint(0, 4096, (B, W), device=dev)
lengths = torch.full((B,), 2001, device=dev)
mask = (torch.arange(W * bs, device=dev)[None] < lengths[:, None])[:, None, None, :]
q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
def gather():
    kv = pool[table, 5]
    k = kv[:, :, 0].reshape(B, -1, KVH, D).transpose(1, 2)
    v = kv[:, :, 1].reshape(B, -1, KVH, D).transpose(1, 2)
    return k, v
def a1():
    k, v = gather()
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)
def a2():
    k, v = gather()
    k = k.repeat_interleave(H // KVH, dim=1); v = v.repeat_interleave(H // KVH, dim=1)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask)
def a3():
    k, v = gather()
    qg = q.view(B, KVH, H // KVH, D)  # grouped: [B, KVH, G, D] as queries against [B, KVH, T, D]
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
def g():
    return gather()
for name, f in (("gather", g), ("gqa", a1), ("repeat", a2), ("grouped", a3)):
    for _ in range(3): f()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): f()
    torch.cuda.synchronize(); print(name, round((time.perf_counter() - t) / 20 * 1000, 3), "ms per layer")
r1 = a1(); r3 = a3().reshape(B, H, 1, D)
print("grouped equals gqa:", torch.allclose(r1.float(), r3.float(), atol=2e-2), (r1.float()-r3.float()).abs().max().item())
