"""Loads a firstkd student checkpoint with Hugging Face transformers and compares its
next-token log-probs with reference values.

    python scripts/hf_load_check.py CHECKPOINT_DIR REFERENCE_JSON MODEL_KEY [ARCHITECTURE]

CHECKPOINT_DIR is what `firstkd distill` writes (config.json, model.safetensors, tokenizer);
REFERENCE_JSON is ../shared/reference/qwen25_coder_reference.json, whose
models[MODEL_KEY].sequences hold input_ids, topk_ids and topk_logprobs computed by transformers
+ torch fp32 from the GGUF file the checkpoint started from. ARCHITECTURE (default
Qwen2ForCausalLM) is the class AutoModelForCausalLM must pick. The checkpoint is loaded with
no conversion (float32, strict: a missing, unexpected or mis-shaped tensor is an error), its
tokenizer must reproduce the reference ids, and at every position the top-5 ids must equal the
reference's (or tie within 1e-4) with log-probs within 2e-3. Prints one JSON line; exit 1 on
any mismatch.
"""
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> int:
    ckpt, ref_path, key = sys.argv[1], sys.argv[2], sys.argv[3]
    arch = sys.argv[4] if len(sys.argv) > 4 else "Qwen2ForCausalLM"
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    model, info = AutoModelForCausalLM.from_pretrained(
        ckpt, torch_dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        print(f"{ckpt}: transformers reported loading problems: {problems}", file=sys.stderr)
        return 1
    if type(model).__name__ != arch:
        print(f"{ckpt}: loaded as {type(model).__name__}, expected {arch}", file=sys.stderr)
        return 1
    tok = AutoTokenizer.from_pretrained(ckpt)
    model.eval()
    ref = json.load(open(ref_path))["models"][key]["sequences"]
    worst, positions = 0.0, 0
    for n, s in enumerate(ref):
        ids = s["input_ids"]
        got_ids = tok(s["text"], add_special_tokens=True)["input_ids"]
        if got_ids != ids:
            print(f"sequence {n}: the checkpoint's tokenizer gives {got_ids[:12]}..., "
                  f"reference {ids[:12]}...", file=sys.stderr)
            return 1
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        for p in range(len(ids) - 1):
            top = torch.topk(lp[p], 5)
            for j in range(5):
                want_id, want_lp = s["topk_ids"][p][j], s["topk_logprobs"][p][j]
                got_id, got_lp = int(top.indices[j]), float(top.values[j])
                if got_id != want_id and abs(got_lp - want_lp) >= 1e-4:
                    print(f"sequence {n} position {p} rank {j}: id {got_id} vs reference "
                          f"{want_id}", file=sys.stderr)
                    return 1
                worst = max(worst, abs(got_lp - want_lp))
            positions += 1
    print(json.dumps({"architecture": type(model).__name__, "positions": positions,
                      "max_logprob_diff": worst, "transformers": transformers.__version__}))
    return 0 if worst < 2e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
