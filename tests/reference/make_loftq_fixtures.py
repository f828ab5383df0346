"""LoftQ references from PEFT (`replace_lora_weights_loftq`: on a bitsandbytes NF4 model, A and B
from the SVD of the quantization error W - deq(NF4(W)), the base left as NF4(W)), for the llama
and phi3 fixtures, r=4, alpha 4 (scale 1), all-linear, NF4 with double quantization:

- `<arch>.safetensors`: PEFT's lora_A / lora_B of every layer after LoftQ, and on `ids` the
  logits of the NF4 model with them (`loftq.logits`), with PEFT's default start (B = 0, so
  the NF4 base: `nf4.logits`) and of the original f32 model (`full.logits`);
- `hone_adapter.logits` there when hone's own LoftQ start (`<arch>_hone_adapter/`, committed by
  hone's `write_hone_loftq_fixtures` test) exists: PEFT's logits with it on the NF4 base.

PEFT's `_loftq_init_new` moves the original weight to "cuda" for the SVD; this machine has none,
so the weight it is handed answers `.to(device=...)` on the CPU (nothing else is changed).

    python tests/reference/make_loftq_fixtures.py
"""
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import loftq_utils
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
OUT = FIX / "loftq"
BNB = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)


class OnCpu:
    """A weight whose `.to(device=..., dtype=...)` stays on the CPU."""

    def __init__(self, t):
        self.t = t

    def to(self, device=None, dtype=None):
        return self.t.to(dtype=dtype)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    get_tensor = loftq_utils._SafetensorLoader.get_tensor
    loftq_utils._SafetensorLoader.get_tensor = lambda self, name: OnCpu(get_tensor(self, name))
    torch.manual_seed(0)
    for arch in ["llama", "phi3"]:
        ids = load_file(str(FIX / arch / "expected.safetensors"))["ids_1"].unsqueeze(0)
        full = AutoModelForCausalLM.from_pretrained(FIX / arch, dtype=torch.float32, attn_implementation="eager").eval()
        nf4 = AutoModelForCausalLM.from_pretrained(FIX / arch, dtype=torch.float32, attn_implementation="eager", quantization_config=BitsAndBytesConfig(**BNB), device_map="cpu")
        cfg = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(nf4, cfg).eval()
        t = {"ids": ids[0]}
        with torch.no_grad():
            t["full.logits"] = full(ids).logits[0].contiguous()
            t["nf4.logits"] = model(ids).logits[0].contiguous()
            loftq_utils.replace_lora_weights_loftq(model, model_path=str(FIX / arch))
            t["loftq.logits"] = model(ids).logits[0].contiguous()
        for n, p in model.named_parameters():
            if "lora_" in n:
                t[n.replace(".default", "")] = p.detach().contiguous().clone()
        hone_dir = OUT / f"{arch}_hone_adapter"
        if hone_dir.exists():
            nf4 = AutoModelForCausalLM.from_pretrained(FIX / arch, dtype=torch.float32, attn_implementation="eager", quantization_config=BitsAndBytesConfig(**BNB), device_map="cpu")
            with torch.no_grad():
                t["hone_adapter.logits"] = PeftModel.from_pretrained(nf4, hone_dir).eval()(ids).logits[0].contiguous()
        save_file(t, str(OUT / f"{arch}.safetensors"))
        err = lambda k: ((t[k] - t["full.logits"]).norm() / t["full.logits"].norm()).item()
        print(arch, f"logits vs the f32 model: NF4 {err('nf4.logits'):.3e}, NF4 + LoftQ {err('loftq.logits'):.3e}")
        assert err("loftq.logits") < err("nf4.logits")


if __name__ == "__main__":
    main()
