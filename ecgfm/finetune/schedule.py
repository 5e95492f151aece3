"""The learning-rate structure of fine-tuning: layer-wise learning-rate decay over the backbone's blocks, linear
warm-up before the cosine schedule, gradual unfreezing and LP-FT (a linear probe, then full fine-tuning).

The backbone's blocks are the module names its model config lists in ``blocks``, from input to output; a backbone
parameter inside none of them goes with the first block. The optimizer holds, from the first step on, every
parameter that ever trains (frozen ones too, with ``requires_grad`` False: AdamW skips a parameter without a
gradient, keeping no state and applying no weight decay), so its param groups are the same in every phase and a
checkpoint's optimizer state loads into a resumed run whatever phase it resumes in. Which blocks train is derived
from the epoch number alone (:class:`BlockUnfreezing`), never stored, so a restored run is in the same phase as the
run it continues.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

if TYPE_CHECKING:
    import lightning as L

    from ecgfm.tasks import FineTuneTask

__all__ = [
    "Block",
    "BlockFreezer",
    "BlockSchedule",
    "BlockUnfreezing",
    "backbone_blocks",
    "check_lr_structure",
    "cosine_with_warmup",
    "param_groups",
    "warmup_length",
]


@dataclass
class Block:
    """One of the backbone's blocks: its name in the model config, its modules and its parameters."""

    name: str
    modules: list[nn.Module]
    params: list[nn.Parameter]


def _inside(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")


def backbone_blocks(backbone: nn.Module, names: Sequence[str], model: str = "the backbone") -> list[Block]:
    """The backbone's blocks from input to output (``names``: its model config's ``blocks``), each with its modules and
    parameters; the parameters and modules inside no block (e.g. Net1D's ``first_bn``) go with the first block.

    Raises:
        ValueError: one line naming the backbone (``model``), when it lists no blocks or one that is not a module.
    """
    if not names:
        raise ValueError(
            f"{model} lists no blocks in its model config (blocks): layer_decay, unfreeze_schedule and lp_ft need them"
        )
    blocks = []
    for name in names:
        try:
            blocks.append(Block(name, [backbone.get_submodule(name)], []))
        except AttributeError:
            raise ValueError(f"{model}: block {name!r} of its model config is not one of its modules") from None
    for name, param in backbone.named_parameters():
        owners = [b for b in blocks if _inside(name, b.name)]
        (max(owners, key=lambda b: len(b.name)) if owners else blocks[0]).params.append(param)
    outside: list[str] = []
    for name, module in backbone.named_modules():
        if not name or any(_inside(name, b.name) or b.name.startswith(name + ".") for b in blocks):
            continue  # the backbone itself, a block, inside one, or a container of blocks
        if not any(_inside(name, o) for o in outside):
            outside.append(name)
            blocks[0].modules.append(module)
    return blocks


class BlockFreezer:
    """Freezes the backbone's blocks below its top ``n`` (and the lead adapter while the first block is frozen: it
    feeds that block) and keeps their modules in eval mode (fixed BatchNorm statistics, no dropout).

    It remembers what it froze, so that unfreezing gives back exactly that: weights frozen for other reasons (an
    unused classifier, ``linear_probe``) stay frozen. With ``keep_grads`` (distributed runs: DDP only synchronises
    the parameters that require gradients when it wraps the model) ``requires_grad`` is left on and the frozen
    parameters' gradients are dropped before each optimizer step instead.
    """

    def __init__(self) -> None:
        self.trainable: int | None = None  # blocks training now, counted from the output; None: never applied
        self.keep_grads = False
        self.frozen_params: list[nn.Parameter] = []
        self.frozen_modules: list[nn.Module] = []

    def froze(self) -> set[int]:
        """Ids of the parameters this freezer holds frozen (ids now: a deep copy of the task has other ones)."""
        return {id(p) for p in self.frozen_params}

    def apply(self, task: FineTuneTask, trainable: int, keep_grads: bool = False) -> bool:
        """Let the top ``trainable`` blocks of ``task``'s backbone train and freeze the others; False if already so."""
        if trainable == self.trainable and keep_grads == self.keep_grads:
            return False
        for param in self.frozen_params:
            param.requires_grad_(True)
        blocks = backbone_blocks(task.backbone, task.backbone_config.blocks, repr(task.backbone_config.name))
        frozen = blocks[: max(0, len(blocks) - trainable)]
        modules = [m for block in frozen for m in block.modules]
        params = [p for block in frozen for p in block.params]
        if frozen:
            modules.append(task.adapter)
            params += list(task.adapter.parameters())
        if len(frozen) == len(blocks):
            modules = [task.backbone, task.adapter]  # all frozen: the containers of blocks too, as linear_probe does
        self.frozen_params = [p for p in params if p.requires_grad]  # the others are frozen for good
        for param in self.frozen_params:
            param.requires_grad_(keep_grads)
        self.frozen_modules, self.trainable, self.keep_grads = modules, trainable, keep_grads
        task.train(task.training)  # blocks given back follow the task's mode; FineTuneTask.train() evals the frozen
        return True

    def eval_frozen(self) -> None:
        """Put the frozen blocks in eval mode (FineTuneTask.train calls it after every ``train()``)."""
        for module in self.frozen_modules:
            module.eval()

    def drop_frozen_grads(self) -> None:
        """Forget the frozen parameters' gradients (only ``keep_grads`` gives them any) before an optimizer step."""
        for param in self.frozen_params:
            param.grad = None


@dataclass(frozen=True)
class BlockSchedule:
    """How many of the backbone's ``n_blocks`` blocks, counted from the output, train in each epoch.

    ``steps`` holds ``(first epoch, blocks training)`` pairs in order of epoch; before the first, none trains.
    """

    steps: tuple[tuple[int, int], ...]
    n_blocks: int

    def trainable(self, epoch: int) -> int:
        count = 0
        for first, blocks in self.steps:
            if epoch >= first:
                count = blocks
        return count

    @classmethod
    def from_options(
        cls,
        finetune: str,
        lp_epochs: int,
        unfreeze_schedule: Mapping[Any, int | str] | Sequence[int] | None,
        n_blocks: int,
    ) -> BlockSchedule | None:
        """The schedule of ``finetune: lp_ft`` (none trains for ``lp_epochs``, then all) or of ``unfreeze_schedule``:
        ``{epoch: n}`` (from that epoch the top ``n`` blocks train, ``all`` for every one) or ``[e1, e2, ...]`` (one
        more block from the top at each of those epochs). None: every block trains throughout.

        Raises:
            ValueError: one line naming the option that is wrong.
        """
        if finetune == "lp_ft":
            if isinstance(lp_epochs, bool) or not isinstance(lp_epochs, int) or lp_epochs < 1:
                raise ValueError(f"finetune: lp_ft needs lp_epochs >= 1 (epochs of linear probing), got {lp_epochs!r}")
            if unfreeze_schedule is not None:
                raise ValueError(
                    "finetune: lp_ft is the unfreeze_schedule {0: 0, lp_epochs: all}; give lp_ft or unfreeze_schedule"
                )
            return cls(((0, 0), (lp_epochs, n_blocks)), n_blocks)
        if lp_epochs:
            raise ValueError(f"lp_epochs ({lp_epochs}) needs finetune: lp_ft, not {finetune!r}")
        if unfreeze_schedule is None:
            return None
        if finetune == "linear_probe":
            raise ValueError("unfreeze_schedule needs finetune: full (linear_probe keeps the backbone frozen)")
        if isinstance(unfreeze_schedule, Mapping):
            steps = sorted((_epoch(key), _blocks(value, n_blocks)) for key, value in unfreeze_schedule.items())
            for (_, before), (epoch, after) in zip(steps, steps[1:], strict=False):
                if after < before:
                    raise ValueError(
                        f"unfreeze_schedule: epoch {epoch} trains {after} blocks, fewer than the {before} of an "
                        "earlier epoch; blocks only unfreeze"
                    )
            return cls(tuple(steps), n_blocks)
        if isinstance(unfreeze_schedule, str) or not isinstance(unfreeze_schedule, Sequence):
            raise ValueError(
                f"unfreeze_schedule must be {{epoch: blocks}} or a list of epochs, got {unfreeze_schedule!r}"
            )
        epochs = [_epoch(e) for e in unfreeze_schedule]
        if epochs != sorted(set(epochs)):
            raise ValueError(f"unfreeze_schedule: the epochs must increase, got {list(unfreeze_schedule)}")
        if len(epochs) > n_blocks:
            raise ValueError(f"unfreeze_schedule unfreezes {len(epochs)} blocks; the backbone has {n_blocks}")
        return cls(tuple((epoch, i + 1) for i, epoch in enumerate(epochs)), n_blocks)


def _epoch(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"unfreeze_schedule: an epoch must be a whole number >= 0, got {value!r}")
    return value


def _blocks(value: Any, n_blocks: int) -> int:
    if value == "all":
        return n_blocks
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= n_blocks:
        raise ValueError(f"unfreeze_schedule: blocks to train must be 0..{n_blocks} or 'all', got {value!r}")
    return value


def block_schedule(task: FineTuneTask) -> BlockSchedule | None:
    """The task's block schedule from its hyper-parameters (None: nothing is scheduled)."""
    hp = task.hparams
    schedule = BlockSchedule.from_options(
        hp.finetune, hp.get("lp_epochs", 0), hp.get("unfreeze_schedule"), len(task.backbone_config.blocks)
    )
    if schedule is not None:  # the blocks must be modules of the backbone
        backbone_blocks(task.backbone, task.backbone_config.blocks, repr(task.backbone_config.name))
    return schedule


def check_lr_structure(task: FineTuneTask) -> None:
    """Refuse inconsistent learning-rate options when the task is built, each with one line naming the key."""
    hp = task.hparams
    decay = hp.get("layer_decay")
    if decay is not None:
        if not 0 < decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {decay}")
        if hp.finetune == "linear_probe":
            raise ValueError("layer_decay needs a backbone that trains; finetune: linear_probe freezes it")
        backbone_blocks(task.backbone, task.backbone_config.blocks, repr(task.backbone_config.name))
    warmup = hp.get("warmup_steps", 0)
    if warmup and hp.scheduler != "cosine":
        raise ValueError(f"warmup_steps needs scheduler: cosine, not {hp.scheduler!r}")
    warmup_length(warmup)  # its form; its length against the run's is checked when fitting
    block_schedule(task)


def param_groups(task: FineTuneTask) -> list[dict[str, Any]]:
    """The optimizer's param groups: ``heads`` (heads and lead adapter) at ``lr``; the backbone at
    ``lr * backbone_lr_scale``, or with ``layer_decay`` one group per block, the last at ``lr * backbone_lr_scale``
    and each earlier one ``layer_decay`` times the next (parameters in no block go with the first).

    Each holds every parameter that trains now or that the block schedule froze, so the groups stay the same in
    every phase of a run; parameters frozen for good (an unused classifier, linear probing, ...) are left out.
    """
    hp = task.hparams
    froze = task.block_freezer.froze()

    def trains(params: Any) -> list[nn.Parameter]:
        return [p for p in params if p.requires_grad or id(p) in froze]

    groups = [{"name": "heads", "params": trains([*task.heads.parameters(), *task.adapter.parameters()]), "lr": hp.lr}]
    base = hp.lr * hp.backbone_lr_scale
    decay = hp.get("layer_decay")
    if decay is None:
        params = trains(task.backbone.parameters())
        if params:
            groups.append({"name": "backbone", "params": params, "lr": base})
        return groups
    blocks = backbone_blocks(task.backbone, task.backbone_config.blocks, repr(task.backbone_config.name))
    for i, block in enumerate(blocks):
        params = trains(block.params)
        if params:
            groups.append(
                {"name": f"backbone.{block.name}", "params": params, "lr": base * decay ** (len(blocks) - 1 - i)}
            )
    return groups


def warmup_length(warmup_steps: int | float, total_steps: int | None = None) -> int:
    """Warm-up steps: ``warmup_steps`` itself (a whole number) or that fraction (0 < f < 1) of ``total_steps``
    (None: only the value's form is checked).

    Raises:
        ValueError: one line naming ``warmup_steps``, for another value or a warm-up as long as the run.
    """
    if isinstance(warmup_steps, float) and 0 < warmup_steps < 1:
        return 0 if total_steps is None else int(warmup_steps * total_steps)
    if isinstance(warmup_steps, float) and warmup_steps.is_integer():
        warmup_steps = int(warmup_steps)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(
            f"warmup_steps must be a whole number of steps >= 0 or a fraction of the run in (0, 1), got {warmup_steps}"
        )
    if warmup_steps and total_steps is not None and warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be fewer than the run's {total_steps} optimizer steps")
    return warmup_steps


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per optimizer step: each group's lr rises linearly from 0 over ``warmup_steps`` (``lr * step / warmup``), then
    follows a cosine from its lr to 0 at ``total_steps``. Without warm-up it is ``CosineAnnealingLR`` (as runs from
    before warm-up existed, so their checkpoints resume)."""
    if not warmup_steps:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:  # a function: LambdaLR leaves it out of the scheduler's state_dict
        if step < warmup_steps:
            return step / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / decay_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class BlockUnfreezing(Callback):
    """Applies a task's :class:`BlockSchedule` at the start of training, of every epoch and of every training batch,
    from ``trainer.current_epoch`` alone: a run resumed in any epoch (mid-epoch included, where Lightning calls no
    ``on_train_epoch_start``) trains the same blocks as the run it continues."""

    def __init__(self, schedule: BlockSchedule):
        self.schedule = schedule

    def _apply(self, trainer: L.Trainer, task: FineTuneTask) -> None:
        epoch = trainer.current_epoch
        trainable = self.schedule.trainable(epoch)
        if task.block_freezer.apply(task, trainable, keep_grads=trainer.world_size > 1):
            rank_zero_info(f"epoch {epoch}: {trainable} of {self.schedule.n_blocks} backbone blocks train")

    def on_train_start(self, trainer: L.Trainer, pl_module: FineTuneTask) -> None:
        self._apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: FineTuneTask) -> None:
        self._apply(trainer, pl_module)  # before any callback's on_train_batch_start sees the new epoch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: FineTuneTask, batch: Any, batch_idx: int) -> None:
        self._apply(trainer, pl_module)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: FineTuneTask, optimizer: torch.optim.Optimizer
    ) -> None:
        pl_module.block_freezer.drop_frozen_grads()  # before clipping: frozen gradients count in no norm


def schedule_callbacks(task: FineTuneTask) -> list[Callback]:
    """The callbacks the task's learning-rate structure needs (FineTuneTask.configure_callbacks adds them)."""
    schedule = block_schedule(task)
    return [BlockUnfreezing(schedule)] if schedule is not None else []
