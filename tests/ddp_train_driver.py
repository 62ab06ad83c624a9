"""Run by test_train_ddp.py under `accelerate launch --cpu --num_processes 2`: trains PiSA-SR for
pix_steps=1, sem_steps=2 and saves each process's LoRA tensors after stage 1 and at the end."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from diffsr.train.config import build_config
from diffsr.train.loop import build_trainer, run_training

hq, sd, out = map(Path, sys.argv[1:4])
cfg = build_config("pisa", dict(data=[str(hq)], output_dir=str(out), base=str(sd), batch_size=2, crop_size=64,
                                pix_steps=1, sem_steps=2, learning_rate=1e-3, lpips_pretrained=False,
                                log_with="csv", checkpoint_every=1, lr_scheduler="linear", log_every=1))  # fmt: skip
trainer = build_trainer(cfg)
run_training(
    trainer,
    log=lambda s: print(f"rank{trainer.acc.process_index if trainer.acc else '?'}: {s}"),
    stop_after=1,
)
rank = trainer.acc.process_index
save_file(
    {k: v.detach().contiguous() for k, v in trainer.state_tensors().items()},
    out / f"stage1-rank{rank}.safetensors",
)
trainer = build_trainer(cfg)
run_training(trainer, resume=True, log=lambda s: None)
save_file(
    {k: v.detach().contiguous() for k, v in trainer.state_tensors().items()},
    out / f"final-rank{rank}.safetensors",
)
