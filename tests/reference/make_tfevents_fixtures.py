"""TensorBoard event files (tests/fixtures/tfevents/), for `hone train --log-dir`:

- `torch.tfevents`: a file PyTorch's `torch.utils.tensorboard.SummaryWriter` writes, with seeded
  scalars, and `torch.json` ({tag: [[step, value], ...]}): hone's test reader must read it back;
- with HONE set (a hone binary), a short `hone train --log-dir` on the llama fixture whose event
  file TensorBoard's own reader (EventAccumulator) must parse, holding metrics.jsonl's series
  (checked here, printed, not committed).

    HONE=target/debug/hone python tests/reference/make_tfevents_fixtures.py
"""
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
OUT = FIX / "tfevents"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(4)
    series = {"train/loss": [], "train/lr": [], "eval/loss": []}
    with tempfile.TemporaryDirectory() as tmp:
        w = SummaryWriter(tmp)
        for step in range(1, 6):
            for tag in ["train/loss", "train/lr"] + (["eval/loss"] if step % 2 == 0 else []):
                v = float(torch.rand(1, generator=g).item() * 3)
                w.add_scalar(tag, v, step, walltime=1000.0 + step)
                series[tag].append([step, torch.tensor(v, dtype=torch.float32).item()])
        w.close()
        (f,) = [p for p in Path(tmp).iterdir() if "tfevents" in p.name]
        shutil.copyfile(f, OUT / "torch.tfevents")
    (OUT / "torch.json").write_text(json.dumps(series, indent=1) + "\n")
    if os.environ.get("HONE"):
        check_hone(os.environ["HONE"])


def check_hone(hone):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("\n".join(json.dumps({"prompt": f"Q{i}: {i}+{i}?", "completion": f" {2 * i}"}) for i in range(12)) + "\n")
        logs = Path(tmp) / "logs"
        subprocess.run([hone, "train", "--quiet", "--steps", "4", "--rank", "2", "--batch-size", "2", "--eval-split", "0.25", "--model", FIX / "llama",
                        "--data", data, "--out", Path(tmp) / "adapter", "--log-dir", logs], check=True)
        acc = EventAccumulator(str(logs))
        acc.Reload()
        rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
        for split in ["train", "eval"]:
            ours = [(r["step"], r["loss"]) for r in rows if r["split"] == split]
            tb = [(e.step, e.value) for e in acc.Scalars(f"{split}/loss")]
            assert len(ours) == len(tb) and all(s == t and abs(a - b) <= 1e-6 * max(1, abs(a)) for (s, a), (t, b) in zip(ours, tb)), (split, ours, tb)
        print("TensorBoard's EventAccumulator reads hone's event file:", {t: len(acc.Scalars(t)) for t in acc.Tags()["scalars"]})


if __name__ == "__main__":
    main()
