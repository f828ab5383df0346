"""Three AdamW steps of LoRA and of QLoRA with PEFT, as hone's trainer must reproduce them:
AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.01) on the LoRA parameters, lr 1e-2 with
transformers' linear schedule (no warmup) over 3 steps, global-norm clipping at 1.0, one batch
of two right-padded sequences (labels -100 on padding), the same each step. Starts from the
PEFT adapter fixture (non-zero B). Records each step's loss and the final A/B.

    python tests/reference/make_train_fixtures.py
"""
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, get_linear_schedule_with_warmup

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
OUT = FIX / "train"
LR, STEPS, CLIP, WD = 1e-2, 3, 1.0, 0.01


def batch(arch):
    e = load_file(str(FIX / arch / "expected.safetensors"))
    seqs = [e["ids_0"], e["ids_1"]]
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.int64)
    labels = torch.full((len(seqs), t), -100, dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        labels[i, : len(s)] = s
    return ids, labels


def torch_adamw(params):
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)


def train(model, ids, labels, make_optimizer=torch_adamw):
    """Returns the losses and final LoRA tensors, and the optimizer (for its state)."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = make_optimizer(params)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=STEPS)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        sched.step()
        losses.append(loss.item())
    out = {"losses": torch.tensor(losses, dtype=torch.float32)}
    for n, p in model.named_parameters():
        if "lora_" in n:
            out[n.replace(".default", "")] = p.detach().float().contiguous().clone()
    return out, opt


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for arch in ["llama"]:
        ids, labels = batch(arch)
        adapter = FIX / "lora" / f"{arch}_peft_adapter"
        base = AutoModelForCausalLM.from_pretrained(FIX / arch, dtype=torch.float32, attn_implementation="eager")
        lora, _ = train(PeftModel.from_pretrained(base, adapter, is_trainable=True), ids, labels)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        qbase = AutoModelForCausalLM.from_pretrained(FIX / arch, dtype=torch.float32, quantization_config=bnb,
                                                     attn_implementation="eager", device_map="cpu")
        qbase.enable_input_require_grads()  # bitsandbytes' exact path (see make_lora_fixtures.py)
        qlora, _ = train(PeftModel.from_pretrained(qbase, adapter, is_trainable=True), ids, labels)
        t = {"ids": ids, "labels": labels}
        t.update(lora)
        t.update({f"qlora.{k}": v for k, v in qlora.items()})
        save_file(t, str(OUT / f"{arch}_adamw.safetensors"))
        print(arch, "lora losses", lora["losses"].tolist(), "qlora losses", qlora["losses"].tolist())


if __name__ == "__main__":
    main()
