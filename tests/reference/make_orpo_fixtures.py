"""What TRL 1.16's ORPO trainer (`trl.experimental.orpo`) computes, for hone's ORPO to match: the
tokenized dataset (each sequence's ids and labels, -100 on its prompt) for each preference format
of make_preference_fixtures.py and at a `max_length` that cuts completions; on the tiny Llama
fixture with the given adapter (tests/fixtures/lora/llama_peft_adapter, B scaled up as for DPO),
each pair's mean completion log-probabilities, the NLL on the chosen sequences, the loss and
TRL's metrics; and three ORPO training steps from that adapter, each step's loss and the adapter
after them.

    python tests/reference/make_orpo_fixtures.py
"""
import json
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from make_preference_fixtures import BETA, DATA, FIX, LONG, MAX_LENGTH, OUT, POLICY_B_SCALE, tokenizer

TRAIN = {"learning_rate": 5e-3, "max_steps": 3}


def model(b_scale=1.0):
    base = AutoModelForCausalLM.from_pretrained(FIX / "llama", dtype=torch.float32, attn_implementation="eager")
    m = PeftModel.from_pretrained(base, FIX / "lora" / "llama_peft_adapter", is_trainable=True)
    if b_scale != 1.0:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.mul_(b_scale)
    return m


def trainer(tok, rows, m=None, **args):
    cfg = ORPOConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False, beta=BETA,
                     per_device_train_batch_size=len(rows), dataset_num_proc=None, seed=0, remove_unused_columns=False,
                     gradient_checkpointing=False, **args)
    return ORPOTrainer(model=m if m is not None else model(), args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)


def processed(t):
    keys = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
    return [{k: ex[k] for k in keys} for ex in t.train_dataset]


def mean_logps(m, ids, labels):
    """Mean completion log-prob per sequence and the summed NLL over all its tokens, plain torch."""
    out = []
    for i, l in zip(ids, labels):
        x = torch.tensor([i])
        with torch.no_grad():
            logp = torch.log_softmax(m(input_ids=x).logits[0, :-1].double(), dim=-1)
        per = logp.gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)
        mask = torch.tensor(l[1:]) != -100
        out.append(((per * mask).sum() / mask.sum()).item())
    return out


def train_steps(tok):
    rows = DATA["text"]
    t = trainer(tok, rows, learning_rate=TRAIN["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, max_steps=TRAIN["max_steps"], logging_steps=1, save_strategy="no")
    t.train()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    nll = [h["nll_loss"] for h in t.state.log_history if "nll_loss" in h]
    adapter = {n.replace(".default", ""): p.detach().contiguous() for n, p in t.model.named_parameters() if ".lora_" in n and ".default." in n}
    save_file(adapter, str(OUT / "orpo_steps_adapter.safetensors"))
    return {**TRAIN, "batch_size": len(rows), "max_grad_norm": 1.0, "losses": losses, "nll_loss": nll}


def main():
    tok = tokenizer()
    fixture = {"beta": BETA, "policy_b_scale": POLICY_B_SCALE, "max_length": MAX_LENGTH, "bos_token_id": tok.bos_token_id,
               "eos_token_id": tok.eos_token_id, "processed": {}}
    for name, rows in DATA.items():
        fixture["processed"][name] = processed(trainer(tok, rows))
    fixture["long_processed"] = processed(trainer(tok, LONG, max_length=MAX_LENGTH))

    rows = DATA["text"]
    t = trainer(tok, rows, m=model(POLICY_B_SCALE))
    t.model.train()
    batch = t.data_collator(list(t.train_dataset))
    loss, metrics = t.get_batch_loss_metrics(t.model, batch)
    ex = list(t.train_dataset)
    chosen = mean_logps(t.model, [e["chosen_input_ids"] for e in ex], [e["chosen_labels"] for e in ex])
    rejected = mean_logps(t.model, [e["rejected_input_ids"] for e in ex], [e["rejected_labels"] for e in ex])
    assert abs(metrics["logps/chosen"] - sum(chosen) / len(chosen)) < 1e-5, (metrics, chosen)
    fixture["pairs"] = {"chosen": chosen, "rejected": rejected}
    fixture["metrics"] = {"loss": loss.item(), **{k: v for k, v in metrics.items() if not k.startswith("logits/")}}
    fixture["train"] = train_steps(tok)
    (OUT / "orpo.json").write_text(json.dumps(fixture, indent=1) + "\n")
    print(json.dumps(fixture["metrics"], indent=1), fixture["train"])


if __name__ == "__main__":
    main()
