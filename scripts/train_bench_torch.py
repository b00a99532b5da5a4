"""PyTorch reference for `cargo run --release --example train_bench`: the same 2-layer
SmolLM2-shaped student (hidden 576, 9 heads, 3 KV heads, ffn 1536, vocab 49152, tied), batch
4 x 256, fp32 on the CPU, loss + backward + clip(1.0) + AdamW per step.

    python3 scripts/train_bench_torch.py [STEPS] [THREADS] [LOSS,LOSS,...]

Losses: kd (top-5 KL, student renormalised over the k gathered logits, as firstkd does),
FIRSTKD_BENCH_SEQ=S trains on 1024 / S rows of S tokens instead of 4 x 256 (as train_bench);
FIRSTKD_BENCH_TOKENS=N sets the tokens per step (default 1024) and FIRSTKD_BENCH_SHAPE=qwen0.5b
trains a Qwen2.5-0.5B-shaped student (24 layers, hidden 896, 14 heads, 2 KV heads, ffn 4864,
vocab 151936, tied, Q/K/V biases, RoPE base 1e6) instead, as train_bench does.
kd-full (the same KL computed through the full-vocabulary log-softmax), kd-tail, ce.
"""
import math, resource, sys, time
import torch
import torch.nn.functional as F

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
kinds = sys.argv[3].split(",") if len(sys.argv) > 3 else ["kd", "kd-full", "kd-tail", "ce"]
torch.set_num_threads(threads)
torch.manual_seed(0)
import os
S = int(os.environ.get("FIRSTKD_BENCH_SEQ", "256"))
N = int(os.environ.get("FIRSTKD_BENCH_TOKENS", "1024"))
if S < 1 or S > N or N % S:
    sys.exit(f"FIRSTKD_BENCH_SEQ={S}: must divide {N}")
SHAPE = os.environ.get("FIRSTKD_BENCH_SHAPE", "2-layer")
if SHAPE == "2-layer":
    H, I, L, NQ, NKV, V, THETA, EPS, BIAS = 576, 1536, 2, 9, 3, 49152, 1e5, 1e-5, False
elif SHAPE == "qwen0.5b":
    H, I, L, NQ, NKV, V, THETA, EPS, BIAS = 896, 4864, 24, 14, 2, 151936, 1e6, 1e-6, True
else:
    sys.exit(f"FIRSTKD_BENCH_SHAPE={SHAPE}: 2-layer or qwen0.5b")
B, K = N // S, 5
HD = H // NQ


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.n1 = torch.nn.Parameter(torch.ones(H)); self.n2 = torch.nn.Parameter(torch.ones(H))
        self.q = torch.nn.Linear(H, NQ * HD, bias=BIAS); self.k = torch.nn.Linear(H, NKV * HD, bias=BIAS)
        self.v = torch.nn.Linear(H, NKV * HD, bias=BIAS); self.o = torch.nn.Linear(NQ * HD, H, bias=False)
        self.g = torch.nn.Linear(H, I, bias=False); self.u = torch.nn.Linear(H, I, bias=False)
        self.d = torch.nn.Linear(I, H, bias=False)

    def forward(self, x, cos, sin):
        def rms(x, w): return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w
        def rope(x):
            x1, x2 = x[..., :HD // 2], x[..., HD // 2:]
            return x * cos + torch.cat([-x2, x1], -1) * sin
        h = rms(x, self.n1)
        q = rope(self.q(h).view(B, S, NQ, HD).transpose(1, 2))
        k = rope(self.k(h).view(B, S, NKV, HD).transpose(1, 2)).repeat_interleave(NQ // NKV, 1)
        v = self.v(h).view(B, S, NKV, HD).transpose(1, 2).repeat_interleave(NQ // NKV, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, S, H))
        h = rms(x, self.n2)
        return x + self.d(F.silu(self.g(h)) * self.u(h))


class Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, H); torch.nn.init.normal_(self.emb.weight, std=0.02)
        self.blocks = torch.nn.ModuleList([Block() for _ in range(L)])
        self.norm = torch.nn.Parameter(torch.ones(H))
        inv = 1.0 / (THETA ** (torch.arange(0, HD, 2).float() / HD))
        ang = torch.arange(S).float()[:, None] * inv[None]
        self.cos = torch.cat([ang.cos(), ang.cos()], -1); self.sin = torch.cat([ang.sin(), ang.sin()], -1)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x, self.cos, self.sin)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * self.norm


def loss_fn(kind, model, h, topk, lps, tgt):
    W = model.emb.weight
    if kind == "kd":
        z = (W[topk] * h[:, None, :]).sum(-1)
        lt = F.log_softmax(lps, -1)
        return (lt.exp() * (lt - F.log_softmax(z, -1))).sum(-1).mean()
    logq = F.log_softmax(h @ W.t(), -1)
    g = logq.gather(1, topk)
    if kind == "kd-full":
        lt = F.log_softmax(lps, -1)
        return (lt.exp() * (lt - (g - g.logsumexp(-1, keepdim=True)))).sum(-1).mean()
    if kind == "kd-tail":
        p = lps.exp(); pt = (1 - p.sum(-1)).clamp_min(0); qt = (1 - g.exp().sum(-1)).clamp_min(1e-12)
        return ((p * (lps - g)).sum(-1) + pt * (pt.clamp_min(1e-12).log() - qt.log())).mean()
    return -logq.gather(1, tgt[:, None]).mean()


print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
print("| loss | steps | median step s | tokens/s | peak RSS MiB |")
print("|---|---:|---:|---:|---:|")
for kind in kinds:
    model = Student()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    times = []
    for step in range(steps + 1):
        ids = torch.randint(0, V, (B, S)); tgt = torch.randint(0, V, (B * S,))
        topk = torch.randint(0, V, (B * S, K))
        lps = torch.sort(-torch.rand(B * S, K) * 5, -1, descending=True).values - 0.1
        t0 = time.perf_counter()
        h = model(ids).reshape(B * S, H)
        loss = loss_fn(kind, model, h, topk, lps, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step > 0:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {kind} | {steps} | {med:.3f} | {B * S / med:.0f} | {rss:.0f} |")
