"""The peer for `cargo xtask bench`: QLoRA with PyTorch + PEFT + bitsandbytes on the CPU, on
the same model, data and settings as `hone train`. Prints one JSON line of its measurements.

    python bench/peft_qlora.py --model M.gguf|DIR --data F.jsonl --steps N --batch-size B
        --max-len T --rank R --alpha A [--quantize nf4|none] [--threads N]

Versions are pinned in tests/reference/requirements.txt. Tokens/s counts the tokens of the
steps after the first (warm-up), padding excluded, as hone does.
"""
import argparse
import json
import os
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--quantize", default="nf4")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--export-hf", help="save the --model GGUF as a Hugging Face folder here and exit")
    p.add_argument("--generate", type=int, default=0, help="instead of training: greedy-generate this many tokens (f32 base) and report tokens/s")
    p.add_argument("--prompt", default="Tell me about the sea.")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(42)

    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model

    if a.export_hf:
        # transformers cannot quantize a GGUF with bitsandbytes: both sides start from the same
        # f32 Hugging Face folder instead.
        d, f = os.path.split(a.model)
        AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(a.export_hf)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        # save_pretrained refuses a model loaded from GGUF; write its config and tensors directly.
        from safetensors.torch import save_file

        cfg = m.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg.save_pretrained(a.export_hf)
        sd = {k: v.contiguous() for k, v in m.state_dict().items()}
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, os.path.join(a.export_hf, "model.safetensors"), metadata={"format": "pt"})
        return

    t0 = time.perf_counter()
    if a.model.endswith(".gguf"):
        d, f = os.path.split(a.model)
        kw = {"gguf_file": f}
        src = d
    else:
        kw = {}
        src = a.model
    tok = AutoTokenizer.from_pretrained(src, **kw)
    if a.generate:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw).eval()
        ids = tok(a.prompt, return_tensors="pt")["input_ids"]
        t1 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=a.generate, min_new_tokens=a.generate, do_sample=False)
        secs = time.perf_counter() - t1
        new = out.shape[1] - ids.shape[1]
        print(json.dumps({"generated": int(new), "generate_tokens_per_s": new / secs}))
        return
    qcfg = None
    if a.quantize == "nf4":
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=qcfg, **kw)
    lcfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    load_s = time.perf_counter() - t0

    texts = [json.loads(line)["text"] for line in open(a.data) if line.strip()]
    eos = tok.eos_token or ""
    encoded = [tok(t + eos, add_special_tokens=False)["input_ids"][: a.max_len] for t in texts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    model.train()
    tokens_after_first = 0
    t_first_end = None
    i = 0
    for step in range(a.steps):
        batch = [encoded[(i + k) % len(encoded)] for k in range(a.batch_size)]
        i += a.batch_size
        t = max(len(x) for x in batch)
        ids = torch.tensor([x + [pad] * (t - len(x)) for x in batch])
        labels = torch.tensor([x + [-100] * (t - len(x)) for x in batch])
        mask = (labels != -100).long()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        if step == 0:
            t_first_end = time.perf_counter()
        else:
            tokens_after_first += sum(len(x) for x in batch)
    train_s = time.perf_counter() - t_first_end
    import resource

    print(json.dumps({
        "load_s": load_s,
        "train_tokens_per_s": tokens_after_first / train_s if train_s > 0 else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": float(out.loss.detach()),
    }))


if __name__ == "__main__":
    main()
