"""QuantFull under ``transformers.Trainer`` with DDP over two CPU processes (gloo), for ``tests/test_distributed.py``.

``python -m torch.distributed.run --nproc_per_node 2 -m tests.distributed_trainer_worker OUT_DIR`` (or ``accelerate
launch``): every rank trains a tiny Llama with QuantFull for ``MAX_STEPS`` steps, checkpointing every
``SAVE_STEPS``, then a new Trainer on a freshly wrapped model resumes from the mid-run checkpoint and trains to the
end. Each rank saves both final states (every QuantFull buffer, float trainable and optimizer state) to
``OUT_DIR/trainer.rank{r}.pt``.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from packaging.version import Version

from tests.conftest import TINY_LLAMA

MAX_STEPS = 4
SAVE_STEPS = 2
BATCH = 2  # rows per rank per step
SEQ = 16
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


class _Rows(torch.utils.data.Dataset):
    """Fixed random token rows (the same in every process): labels are the inputs (causal LM loss)."""

    def __init__(self) -> None:
        self.rows = torch.randint(0, TINY_LLAMA["vocab_size"], (BATCH * 2 * MAX_STEPS, SEQ),
                                  generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.rows[index], "labels": self.rows[index].clone()}


def _model():
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_quant import QuantFullConfig

    torch.manual_seed(0)
    return get_peft_model(LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)), QuantFullConfig(target_modules=TARGETS))


def _state(model, optimizer) -> dict[str, torch.Tensor]:
    """QuantFull's buffers and float trainables, and every tensor of the optimizer state, cloned."""
    state = {name: t.detach().clone() for name, t in model.state_dict().items() if ".qf_" in name}
    for index, entry in optimizer.state_dict()["state"].items():
        state.update({f"optimizer.{index}.{key}": torch.as_tensor(value).clone() for key, value in entry.items()})
    return state


def run(output_dir: str, resume: str | None = None) -> dict:
    from transformers import Trainer, TrainingArguments

    from peft_quant import QuantFullOptimizer

    model = _model()
    optimizer = QuantFullOptimizer(model, lr=3e-3)
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=BATCH, max_steps=MAX_STEPS, learning_rate=3e-3,
        save_strategy="steps", save_steps=SAVE_STEPS, use_cpu=True, ddp_backend="gloo", report_to=[], seed=0,
        data_seed=0, dataloader_num_workers=0, disable_tqdm=True, logging_steps=1,
        ddp_broadcast_buffers=False,  # QuantFull's int8 codes are buffers: keep rank 0's copy from masking drift
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), optimizers=(optimizer, None))
    initial = _state(model, optimizer)
    forwards = []  # training forwards this run took (a resumed run takes only the steps after the checkpoint)
    model.register_forward_pre_hook(lambda module, inputs: forwards.append(module.training))
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.args.world_size == 2 and trainer.args.parallel_mode.value == "distributed", trainer.args
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return dict(initial=initial, state=_state(model, optimizer), losses=losses, forwards=sum(forwards),
                ddp=type(trainer.model_wrapped).__name__)


# Resuming a multi-process CPU run needs transformers >= 5.18: older Trainers load the optimizer state with
# map_location=args.device, "cpu:0", which torch cannot restore ("don't know how to restore data location").
CPU_DDP_RESUME = Version(version("transformers")) >= Version("5.18")


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    full = run(os.path.join(out_dir, "full"))
    checkpoint = os.path.join(out_dir, "full", f"checkpoint-{SAVE_STEPS}")
    resumed = run(os.path.join(out_dir, "resumed"), resume=checkpoint) if CPU_DDP_RESUME else None
    torch.save(dict(full=full, resumed=resumed), Path(out_dir) / f"trainer.rank{rank}.pt")
    torch.distributed.barrier()  # gloo's worker thread drops the last collectives' tensors before the group is torn
    # down at exit (see examples/data_parallel.py)


if __name__ == "__main__":
    main(sys.argv[1])
