"""Reference labeller for the speed benchmark: what a user of the FIRST paper's code runs.
Hugging Face transformers + torch fp32 on the same GGUF (dequantized), N threads, batch 1,
log_softmax + top-k at every position, entropy and target log-prob, written to Parquet (zstd).

Usage: python bench_label_reference.py GGUF TEXT_FILE SEQ_LEN MAX_TOKENS OUT.parquet THREADS [BATCH]
BATCH (default 1): windows per forward pass; the last, shorter window is padded on the right
(causal attention: the real positions' values do not depend on the padding).
Prints one JSON line: {"seq_len", "tokens", "seconds", "tokens_per_s"} (model loading excluded).
"""
import json, sys, time

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, text_file, seq_len, max_tokens, out, threads = sys.argv[1:7]
seq_len, max_tokens, threads = int(seq_len), int(max_tokens), int(threads)
batch = int(sys.argv[7]) if len(sys.argv) > 7 else 1
torch.set_num_threads(threads)
d, f = gguf.rsplit("/", 1)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
text = open(text_file).read()
ids = tok(text)["input_ids"]
if max_tokens > 0:
    ids = ids[:max_tokens]
windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) >= 2]
rows = {"sample_id": [], "position": [], "topk_ids": [], "topk_logprobs": [], "target_logprob": [], "entropy": []}
start = time.perf_counter()
with torch.inference_mode():
    for first in range(0, len(windows), batch):
        group = windows[first:first + batch]
        longest = max(len(w) for w in group)
        x = torch.tensor([w + [0] * (longest - len(w)) for w in group])
        logits = model(x).logits.float()
        for j, w in enumerate(group):
            sid = first + j
            lp = torch.log_softmax(logits[j, : len(w)], -1)[:-1]
            v, i = lp.topk(5, -1)
            ent = -(lp.exp() * lp).sum(-1)
            tgt = lp.gather(1, torch.tensor(w[1:]).unsqueeze(1)).squeeze(1)
            n = len(w) - 1
            rows["sample_id"] += [sid] * n
            rows["position"] += list(range(n))
            rows["topk_ids"] += i.tolist()
            rows["topk_logprobs"] += v.tolist()
            rows["target_logprob"] += tgt.tolist()
            rows["entropy"] += ent.tolist()
pq.write_table(pa.table(rows), out, compression="zstd")
seconds = time.perf_counter() - start
tokens = sum(len(w) for w in windows)
print(json.dumps({"seq_len": seq_len, "batch": batch, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}))
