"""DoRA references from PEFT (`use_dora=True`), on a plain f32 base and on an NF4 base
(bitsandbytes, double quant, f32 compute), for the llama and phi3 fixtures:

- `<arch>_peft_adapter/`: a DoRA adapter PEFT saved (r=4, alpha 8, all-linear), with non-zero B
  and a magnitude vector moved off its initial row norms, so every gradient is non-zero;
- `<arch>_grads.safetensors`: loss and the lora_A / lora_B / lora_magnitude_vector gradients of
  one forward and backward, f32 base and (`qlora.`) NF4 base;
- `<arch>_merged.safetensors`: the adapted layers' weights after PEFT's merge_and_unload;
- `<arch>_adapter_logits.safetensors`: logits of the PEFT adapter and of the hone-written one
  (`<arch>_hone_adapter/`, committed by hone's `write_hone_dora_adapter_fixtures` test), each
  loaded by PEFT;
- `llama_adamw.safetensors`: three AdamW steps as tests/reference/make_train_fixtures.py takes
  them, with the DoRA adapter, f32 and (`qlora.`) NF4 bases.

    python tests/reference/make_dora_fixtures.py
"""
import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from make_lora_fixtures import merged
from make_train_fixtures import batch, train

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
OUT = FIX / "dora"
BNB = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)


def plain(name):
    """PEFT's parameter name as saved: without the adapter name (and the magnitude's `.weight`)."""
    name = name.replace(".default", "")
    return name.removesuffix(".weight") if "lora_magnitude_vector" in name else name


def loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {plain(n): p.grad.detach().float().contiguous().clone() for n, p in model.named_parameters() if "lora_" in n}
    return out.loss.detach().float(), grads


def base(arch, nf4=False):
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    if nf4:
        kw.update(quantization_config=BitsAndBytesConfig(**BNB), device_map="cpu")
    m = AutoModelForCausalLM.from_pretrained(FIX / arch, **kw)
    if nf4:
        m.enable_input_require_grads()  # bitsandbytes' exact path (see make_lora_fixtures.py)
    return m


def save_adapter(model, arch):
    adapter_dir = OUT / f"{arch}_peft_adapter"
    model.save_pretrained(adapter_dir)
    (adapter_dir / "README.md").unlink()
    cfg_path = adapter_dir / "adapter_config.json"
    saved = json.loads(cfg_path.read_text())
    saved["base_model_name_or_path"] = f"tests/fixtures/{arch}"
    saved["target_modules"] = sorted(saved["target_modules"])
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return adapter_dir


def logits(arch, adapter_dir, ids):
    model = PeftModel.from_pretrained(base(arch), adapter_dir).eval()
    check = model.load_adapter(adapter_dir, adapter_name="check")
    missing = [k for k in check.missing_keys if "lora_" in k and ".check" in k]
    assert not missing and not check.unexpected_keys, (missing, check.unexpected_keys)
    with torch.no_grad():
        return model(ids).logits[0].contiguous()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for arch in ["llama", "phi3"]:
        ids = load_file(str(FIX / arch / "expected.safetensors"))["ids_1"].unsqueeze(0)
        torch.manual_seed(0)
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM")
        model = get_peft_model(base(arch), cfg)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
                if "lora_magnitude_vector" in name:  # and the magnitude at the row norms of W
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
        adapter_dir = save_adapter(model, arch)
        loss, grads = loss_and_grads(model, ids)
        t = {"loss": loss.reshape(1), "ids": ids[0]}
        t.update({f"{k}.grad": v for k, v in grads.items()})
        qmodel = PeftModel.from_pretrained(base(arch, nf4=True), adapter_dir, is_trainable=True)
        qloss, qgrads = loss_and_grads(qmodel, ids)
        t["qlora.loss"] = qloss.reshape(1)
        t.update({f"qlora.{k}.grad": v for k, v in qgrads.items()})
        save_file(t, str(OUT / f"{arch}_grads.safetensors"))
        save_file(merged(FIX / arch, adapter_dir), str(OUT / f"{arch}_merged.safetensors"))
        out = {"ids": ids[0], "peft_adapter.logits": logits(arch, adapter_dir, ids)}
        hone_dir = OUT / f"{arch}_hone_adapter"
        if hone_dir.exists():
            out["hone_adapter.logits"] = logits(arch, hone_dir, ids)
        save_file(out, str(OUT / f"{arch}_adapter_logits.safetensors"))
        print(arch, "loss", loss.item(), "qlora loss", qloss.item(), len(grads), "DoRA tensors")

    ids, labels = batch("llama")
    adapter = OUT / "llama_peft_adapter"
    t = {"ids": ids, "labels": labels}
    for prefix, nf4 in [("", False), ("qlora.", True)]:
        result, _ = train(PeftModel.from_pretrained(base("llama", nf4), adapter, is_trainable=True), ids, labels)
        t.update({prefix + plain(k): v for k, v in result.items()})
        print("llama", prefix or "lora.", "losses", result["losses"].tolist())
    save_file(t, str(OUT / "llama_adamw.safetensors"))


if __name__ == "__main__":
    main()
