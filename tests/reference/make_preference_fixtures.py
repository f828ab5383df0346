"""What TRL's DPOTrainer computes, for hone's preference code to match: the processed dataset
(prompt/chosen/rejected ids) for each preference format, the pairs `max_length` drops, and, on
the tiny Llama fixture with a given adapter (tests/fixtures/lora/llama_peft_adapter), each pair's policy
and reference log-probabilities, the loss and TRL's reward metrics for the sigmoid, ipo and
hinge losses; and three DPO training steps from that adapter (TRL's reference then is a frozen
copy of it), each step's loss and the adapter after them.

For the log-probabilities the trainer adds a new adapter (its reference is then the base with the
adapter off) and the given adapter's weights, B scaled up, are put in it; for the training steps
it is given the PEFT model itself.

    python tests/reference/make_preference_fixtures.py
"""
import json
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
OUT = FIX / "preference"

DATA = {
    "text": [
        {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Berlin."},
        {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5, or maybe 22"},
        {"prompt": "hone fine-tunes models", "chosen": " in the browser.", "rejected": " nowhere<|end|>"},
    ],
    "conversational": [
        {"prompt": [{"role": "user", "content": "What is LoRA?"}],
         "chosen": [{"role": "assistant", "content": "Low-rank adaptation."}],
         "rejected": [{"role": "assistant", "content": "A kind of radio."}]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And QLoRA?"}],
         "chosen": [{"role": "assistant", "content": "LoRA on a 4-bit base."}],
         "rejected": [{"role": "assistant", "content": "No idea at all, sorry."}]},
    ],
    "implicit_text": [
        {"chosen": "Q: what colour is the sky? A: blue", "rejected": "Q: what colour is the sky? A: green"},
        {"chosen": "Roses are red", "rejected": "Roses are"},
    ],
    "implicit_conversational": [
        {"chosen": [{"role": "user", "content": "Where is the sun?"}, {"role": "assistant", "content": "In the sky."}],
         "rejected": [{"role": "user", "content": "Where is the sun?"}, {"role": "assistant", "content": "In the sea."}]},
    ],
}
# Prompts of 6, 24 and 5 tokens (text): at max_length 8 the second is dropped.
MAX_LENGTH = 8
LONG = [
    {"prompt": "hone", "chosen": " trains.", "rejected": " sleeps."},
    {"prompt": "A much longer prompt than the limit allows, by several tokens at least", "chosen": " yes", "rejected": " no"},
    {"prompt": "ab", "chosen": " a long completion past the limit", "rejected": " c"},
]
BETA = 0.1
POLICY_B_SCALE = 20.0


def tokenizer():
    tok = PreTrainedTokenizerFast.from_pretrained(FIX / "chat")
    return tok


def trainer(tok, rows, **args):
    """A DPOTrainer that adds a new adapter (so the reference is the base, adapter off)."""
    model = AutoModelForCausalLM.from_pretrained(FIX / "llama", dtype=torch.float32, attn_implementation="eager")
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    out = tempfile.mkdtemp()
    cfg = DPOConfig(output_dir=out, report_to="none", use_cpu=True, bf16=False, beta=BETA, per_device_train_batch_size=len(rows),
                    dataset_num_proc=None, seed=0, **args)
    return DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                      peft_config=peft)


def processed(t):
    return [{k: ex[k] for k in ["prompt_ids", "chosen_ids", "rejected_ids"]} for ex in t.train_dataset]


def policy_logps(model, inputs):
    """Summed completion log-probs per sequence, as plain torch (checked against TRL's metrics)."""
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = inputs["input_ids"][:, 1:]
    per_token = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (per_token * inputs["completion_mask"][:, 1:]).sum(1)


TRAIN = {"learning_rate": 5e-3, "max_steps": 3, "loss_type": "sigmoid"}


def train_steps(tok):
    """Three DPO steps from the given adapter (full batch of the text pairs, constant lr, no
    dropout; TRL's reference is a frozen copy of the starting adapter): each step's loss and the
    adapter after them."""
    base = AutoModelForCausalLM.from_pretrained(FIX / "llama", dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, FIX / "lora" / "llama_peft_adapter", is_trainable=True)
    rows = DATA["text"]
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False, beta=BETA,
                    per_device_train_batch_size=len(rows), learning_rate=TRAIN["learning_rate"],
                    lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                    max_steps=TRAIN["max_steps"], loss_type=[TRAIN["loss_type"]], logging_steps=1, save_strategy="no",
                    seed=0, dataset_num_proc=None)
    t = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
    t.train()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    margins = [h["rewards/margins"] for h in t.state.log_history if "rewards/margins" in h]
    adapter = {n.replace(".default", ""): p.detach().contiguous() for n, p in t.model.named_parameters() if ".lora_" in n and ".default." in n}
    save_file(adapter, str(OUT / "dpo_steps_adapter.safetensors"))
    return {**TRAIN, "batch_size": len(rows), "max_grad_norm": 1.0, "losses": losses, "margins": margins}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    fixture = {"beta": BETA, "policy_b_scale": POLICY_B_SCALE, "max_length": MAX_LENGTH, "data": DATA, "long": LONG, "processed": {}}

    given = load_file(str(FIX / "lora" / "llama_peft_adapter" / "adapter_model.safetensors"))
    for name, rows in DATA.items():
        fixture["processed"][name] = processed(trainer(tok, rows))
    t = trainer(tok, LONG, max_length=MAX_LENGTH)
    fixture["long_processed"] = processed(t)
    batch = t.data_collator(list(t.train_dataset))
    fixture["long_batch"] = {k: batch[k].tolist() for k in ["input_ids", "completion_mask"]}

    # Log-probs, losses and metrics on one batch of the text pairs.
    rows = DATA["text"]
    fixture["losses"] = {}
    for loss_type in ["sigmoid", "ipo", "hinge"]:
        t = trainer(tok, rows, loss_type=[loss_type])
        # The policy: the given adapter's weights in the trainer's new adapter.
        with torch.no_grad():
            for name, p in t.model.named_parameters():
                if ".lora_" in name:
                    # B scaled up: a policy far enough from the reference that the rewards are not at f32 noise.
                    w = given[name.replace(".default", "")]
                    p.copy_(w * POLICY_B_SCALE if "lora_B" in name else w)
        t.model.train()
        inputs = t.data_collator(list(t.train_dataset))
        fixture["batch"] = {k: inputs[k].tolist() for k in ["input_ids", "completion_mask"]}
        ref_c, ref_r = t.compute_ref_log_probs(t.model, inputs)
        pol = policy_logps(t.model, inputs)
        pol_c, pol_r = pol.chunk(2)
        t._metrics["train"].clear()
        loss = t._compute_loss(t.model, inputs, False)
        m = {k: v[-1] for k, v in t._metrics["train"].items()}
        assert abs(m["logps/chosen"] - pol_c.mean().item()) < 1e-5, (m["logps/chosen"], pol_c)
        assert abs(m["logps/rejected"] - pol_r.mean().item()) < 1e-5, (m["logps/rejected"], pol_r)
        fixture["pairs"] = {"policy_chosen": pol_c.tolist(), "policy_rejected": pol_r.tolist(),
                            "ref_chosen": ref_c.double().tolist(), "ref_rejected": ref_r.double().tolist()}
        fixture["losses"][loss_type] = {"loss": loss.item(), **{k: m[k] for k in [
            "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected"]}}
    fixture["train"] = train_steps(tok)
    (OUT / "dpo.json").write_text(json.dumps(fixture, indent=1) + "\n")
    print(json.dumps(fixture["losses"], indent=1))


if __name__ == "__main__":
    main()
