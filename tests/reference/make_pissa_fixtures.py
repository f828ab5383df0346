"""PiSSA references from PEFT (`init_lora_weights="pissa"`: A and B from the SVD of W, the base
left as the residual W - s·B·A), for the llama and phi3 fixtures, r=4, alpha 8, all-linear:

- `<arch>_init.safetensors`: PEFT's initial lora_A / lora_B of every layer, the residual weights
  (`residual.<module>.weight`), and, after moving A and B by a seeded step (as training would),
  the logits of residual + moved adapter (`moved.logits`) on `ids`;
- `<arch>_moved_adapter/`: that moved adapter as PEFT saves it (rank r, for the residual base);
- `<arch>_converted_adapter/`: PEFT's conversion of it for the original base
  (`save_pretrained(path_initial_model_for_weight_conversion=...)`: rank 2r, alpha doubled);
- `hone_converted.logits` in `<arch>_init.safetensors` when hone's own conversion
  (`<arch>_hone_converted_adapter/`, committed by hone's `write_hone_pissa_fixtures` test)
  exists: PEFT's logits with it on the original base.

    python tests/reference/make_pissa_fixtures.py
"""
import json
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
OUT = FIX / "pissa"


def base(arch):
    return AutoModelForCausalLM.from_pretrained(FIX / arch, dtype=torch.float32, attn_implementation="eager")


def tidy(adapter_dir, arch):
    """Stable files: no model card, a relative base path, sorted targets."""
    (adapter_dir / "README.md").unlink(missing_ok=True)
    cfg_path = adapter_dir / "adapter_config.json"
    saved = json.loads(cfg_path.read_text())
    saved["base_model_name_or_path"] = f"tests/fixtures/{arch}"
    saved["target_modules"] = sorted(saved["target_modules"])
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for arch in ["llama", "phi3"]:
        ids = load_file(str(FIX / arch / "expected.safetensors"))["ids_1"].unsqueeze(0)
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights="pissa", task_type="CAUSAL_LM")
        model = get_peft_model(base(arch), cfg)
        t = {"ids": ids[0]}
        with tempfile.TemporaryDirectory() as tmp:
            init_dir = Path(tmp) / "pissa_init"
            model.save_pretrained(init_dir)  # the initial adapter, for the conversion below
            for n, p in model.named_parameters():
                if "lora_" in n:
                    t[n.replace(".default", "")] = p.detach().contiguous().clone()
            for n, m in model.named_modules():
                if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
                    t["residual." + n.replace("base_model.model.", "") + ".weight"] = m.base_layer.weight.detach().contiguous().clone()
            g = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_" in n:
                        p.add_(0.02 * torch.randn(p.shape, generator=g))
                t["moved.logits"] = model(ids).logits[0].contiguous()
            moved = OUT / f"{arch}_moved_adapter"
            shutil.rmtree(moved, ignore_errors=True)
            model.save_pretrained(moved)
            tidy(moved, arch)
            converted = OUT / f"{arch}_converted_adapter"
            shutil.rmtree(converted, ignore_errors=True)
            model.save_pretrained(converted, path_initial_model_for_weight_conversion=str(init_dir))
            tidy(converted, arch)
        # PEFT's converted adapter on the original base gives residual + moved adapter's logits.
        check = PeftModel.from_pretrained(base(arch), converted).eval()
        with torch.no_grad():
            err = (check(ids).logits[0] - t["moved.logits"]).norm() / t["moved.logits"].norm()
        assert err < 1e-4, err
        hone_dir = OUT / f"{arch}_hone_converted_adapter"
        if hone_dir.exists():
            with torch.no_grad():
                t["hone_converted.logits"] = PeftModel.from_pretrained(base(arch), hone_dir).eval()(ids).logits[0].contiguous()
        save_file(t, str(OUT / f"{arch}_init.safetensors"))
        print(arch, "converted adapter on the original base vs residual + moved:", f"{err.item():.2e}")


if __name__ == "__main__":
    main()
