"""bitsandbytes' 8-bit AdamW (`bnb.optim.AdamW8bit`, what transformers' `optim="adamw_bnb_8bit"`
and `"paged_adamw_8bit"` run), as hone's `--optim adamw_8bit` must reproduce it, on the CPU:

- optim/adamw8bit_steps.safetensors: three updates of three seeded tensors with seeded
  gradients (lr 1e-3, weight decay 0.01): one of 5120 values (20 whole blocks of 256), one of
  4830 (a partial last block), one of 512 (under `min_8bit_size` 4096: 32-bit state). Holds
  each step's gradients, the initial and final parameters, the final 8-bit states (`state1`/`state2` codes into
  the signed/unsigned dynamic maps, `absmax1`/`absmax2` per block of 256) and both maps.
- train/llama_adamw8bit.safetensors: make_train_fixtures.py's QLoRA run (three steps, clipping,
  linear schedule) with AdamW8bit(min_8bit_size=256) instead of torch's AdamW: losses and the
  final A/B.

    python tests/reference/make_optim_fixtures.py
"""
from pathlib import Path

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import create_dynamic_map
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from make_train_fixtures import LR, WD, batch, train

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def steps():
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (16, 320), "b": (21, 230), "c": (8, 64)}
    params = {k: torch.nn.Parameter(torch.randn(s, generator=g) * 0.05) for k, s in shapes.items()}
    out = {f"{k}.init": p.detach().clone() for k, p in params.items()}
    opt = bnb.optim.AdamW8bit(params.values(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for step in range(3):
        for k, p in params.items():
            # Gradients of mixed scales, some exactly zero, as LoRA's B sees at first.
            grad = torch.randn(p.shape, generator=g) * (10.0 ** torch.randint(-4, 0, p.shape, generator=g))
            grad[torch.rand(p.shape, generator=g) < 0.05] = 0.0
            p.grad = grad
            out[f"{k}.grad.{step}"] = grad.clone()
        opt.step()
    for k, p in params.items():
        out[f"{k}.param"] = p.detach().clone()
    for k, p in params.items():
        st = opt.state[p]
        for name in ["state1", "state2", "absmax1", "absmax2"]:
            if name in st:  # the 32-bit state of a small tensor has no absmax
                out[f"{k}.{name}"] = st[name].clone().contiguous()
    out["qmap1"] = create_dynamic_map(signed=True)
    out["qmap2"] = create_dynamic_map(signed=False)
    save_file(out, str(FIX / "optim" / "adamw8bit_steps.safetensors"))
    print("steps:", {k: v.dtype for k, v in out.items() if k.endswith("state1")})


def train_qlora():
    arch = "llama"
    ids, labels = batch(arch)
    adapter = FIX / "lora" / f"{arch}_peft_adapter"
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(FIX / arch, dtype=torch.float32, quantization_config=q,
                                                attn_implementation="eager", device_map="cpu")
    base.enable_input_require_grads()
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    adamw8bit = lambda params: bnb.optim.AdamW8bit(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD, min_8bit_size=256)
    out, opt = train(model, ids, labels, adamw8bit)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    eight = sum(1 for p in params if opt.state[p]["state1"].dtype == torch.uint8)
    save_file(out, str(FIX / "train" / f"{arch}_adamw8bit.safetensors"))
    print("train: losses", out["losses"].tolist(), f"({eight} of {len(params)} tensors with 8-bit state)")


if __name__ == "__main__":
    torch.manual_seed(0)
    steps()
    train_qlora()
