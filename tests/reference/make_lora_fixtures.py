"""LoRA and QLoRA references from PEFT (+ bitsandbytes NF4 on the CPU): an adapter saved by
PEFT with non-zero A and B, the loss and every lora_A/lora_B gradient after one forward and
backward on fixed tokens, for a plain f32 base and for an NF4 (double-quant) base.

    python tests/reference/make_lora_fixtures.py
"""
import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
OUT = FIX / "lora"


def loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            # PEFT names: base_model.model.<path>.lora_A.default.weight
            grads[name.replace(".default", "")] = p.grad.detach().float().contiguous().clone()
    return out.loss.detach().float(), grads


def adapter_logits(arch, base_dir, ids):
    """Logits of the base, of the PEFT-written adapter, and of the hone-written adapter
    (committed by hone's `write_hone_adapter_fixtures` test), each loaded by PEFT."""
    out = {"ids": ids[0]}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out["base.logits"] = base(ids).logits[0].contiguous()
    for which in ["peft", "hone"]:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
        model = PeftModel.from_pretrained(base, OUT / f"{arch}_{which}_adapter").eval()
        check = model.load_adapter(OUT / f"{arch}_{which}_adapter", adapter_name="check")
        missing = [k for k in check.missing_keys if "lora_" in k and ".check." in k]
        assert not missing and not check.unexpected_keys, (missing, check.unexpected_keys)
        with torch.no_grad():
            out[f"{which}_adapter.logits"] = model(ids).logits[0].contiguous()
    return out


MERGE_ADAPTER = {"llama": "peft", "phi3": "hone"}


def merged(base_dir, adapter_dir):
    """PEFT's merge_and_unload in f32: the merged weights of the adapted layers."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    adapted = {n.rsplit(".lora_A", 1)[0].replace("base_model.model.", "") for n, _ in model.named_parameters() if ".lora_A." in n}
    state = model.merge_and_unload().state_dict()
    return {f"{m}.weight": state[f"{m}.weight"].contiguous() for m in sorted(adapted)}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for arch in ["llama", "phi3"]:
        base_dir = FIX / arch
        ids = load_file(str(base_dir / "expected.safetensors"))["ids_1"].unsqueeze(0)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero; non-zero B makes A's gradient non-zero
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        adapter_dir = OUT / f"{arch}_peft_adapter"
        model.save_pretrained(adapter_dir)
        (adapter_dir / "README.md").unlink()  # PEFT's model card: not needed
        # Stable fixtures: a relative base path, and target_modules (a set in PEFT) sorted.
        cfg_path = adapter_dir / "adapter_config.json"
        saved = json.loads(cfg_path.read_text())
        saved["base_model_name_or_path"] = f"tests/fixtures/{arch}"
        saved["target_modules"] = sorted(saved["target_modules"])
        cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        loss, grads = loss_and_grads(model, ids)
        t = {"loss": loss.reshape(1), "ids": ids[0]}
        t.update({f"{k}.grad": v for k, v in grads.items()})

        # QLoRA: the same adapter on the base quantized to NF4 by bitsandbytes.
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        qbase = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=bnb,
                                                     attn_implementation="eager", device_map="cpu")
        # As prepare_model_for_kbit_training does: inputs to every 4-bit layer require grad, so
        # bitsandbytes takes its exact path (dequantize, then f32 matmul) rather than its CPU
        # inference kernel, which differed from dequantize+matmul by ~1e-2 here.
        qbase.enable_input_require_grads()
        qmodel = PeftModel.from_pretrained(qbase, adapter_dir, is_trainable=True)
        qloss, qgrads = loss_and_grads(qmodel, ids)
        t["qlora.loss"] = qloss.reshape(1)
        t.update({f"qlora.{k}.grad": v for k, v in qgrads.items()})
        save_file(t, str(OUT / f"{arch}_grads.safetensors"))
        save_file(adapter_logits(arch, base_dir, ids), str(OUT / f"{arch}_adapter_logits.safetensors"))
        save_file(merged(base_dir, OUT / f"{arch}_{MERGE_ADAPTER[arch]}_adapter"), str(OUT / f"{arch}_merged.safetensors"))
        print(arch, "loss", loss.item(), "qlora loss", qloss.item(), len(grads), "lora tensors")


if __name__ == "__main__":
    main()
