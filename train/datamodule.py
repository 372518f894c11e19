"""LightningDataModule over core/data.py: packed training blocks, held-out validation windows.

Optional sequence-level KD adds teacher-generated continuations of training prompts, cached to
disk as a plain tensor (loaded with weights_only=True) keyed by the teacher and settings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tqdm import tqdm

from core.data import heldout_windows, load_split_or_file, pack_blocks, tokenize_joined


class _Windows:
    """This rank's validation windows, one at a time, each with a weight: 1 to count it, 0 for a
    placeholder (a plain iterable: Lightning would read a list as many loaders).

    Every rank gets the same number of batches (Lightning refuses an empty loader on any rank, and
    collective calls need every rank to take part): rank r takes windows r, r + world, ..., and a
    rank left short repeats a window with weight 0, which the module runs but does not count.
    """

    def __init__(self, windows: torch.Tensor, rank: int = 0, world: int = 1):
        self.mine = windows[rank::world]
        self.length = -(-windows.shape[0] // world)  # ceil: the longest rank's share
        self.filler = windows[:1]

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for i in range(self.length):
            if i < self.mine.shape[0]:
                yield self.mine[i:i + 1], torch.ones(())
            else:
                yield self.filler, torch.zeros(())


class ShuffledBlocks:
    """Training batches whose order is a pure function of (seed, epoch, rank), so a resumed run
    sees exactly the batches the interrupted one would have seen next.

    The first iteration starts at the position implied by the trainer's restored global step;
    under DDP each rank takes a disjoint slice of every epoch's permutation.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int, grad_accum: int = 1):
        self.blocks, self.batch_size, self.seed, self.grad_accum = blocks, batch_size, seed, grad_accum
        self.trainer: Any = None
        self._next_epoch: int | None = None

    def state_dict(self) -> dict[str, int]:
        """Marks the loader resumable for Lightning; the position itself derives from the global step."""
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"checkpoint was trained with data seed {state['seed']}, this run uses {self.seed}")

    def _shard(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def __len__(self) -> int:
        rank, world = self._shard()
        return (self.blocks.shape[0] // world) // self.batch_size

    def indices(self, epoch: int) -> torch.Tensor:
        rank, world = self._shard()
        perm = torch.randperm(self.blocks.shape[0], generator=torch.Generator().manual_seed(self.seed + epoch))
        per_rank = self.blocks.shape[0] // world
        return perm[rank * per_rank:(rank + 1) * per_rank]

    def __iter__(self):
        n = len(self)
        if n == 0:
            raise ValueError(f"too few training blocks ({self.blocks.shape[0]}) for batch size {self.batch_size}")
        if self._next_epoch is None:
            consumed = (self.trainer.global_step * self.grad_accum) if self.trainer is not None else 0
            epoch, skip = divmod(consumed, n)
        else:
            epoch, skip = self._next_epoch, 0
        self._next_epoch = epoch + 1
        order = self.indices(epoch)
        for b in range(skip, n):
            yield self.blocks[order[b * self.batch_size:(b + 1) * self.batch_size]]


@torch.no_grad()
def teacher_continuations(teacher: torch.nn.Module, tokenizer: Any, texts: list[str], prompt_tokens: int,
                          new_tokens: int, cache_dir: Path, teacher_hash: str, samples: int = 1,
                          batch_size: int = 8, seed: int = 0) -> torch.Tensor:
    """Teacher continuations of each text's first `prompt_tokens` tokens: (n * samples, prompt + new).

    One greedy continuation per prompt when samples == 1, else `samples` sampled ones (T=1).
    """
    key = hashlib.sha256(f"{teacher_hash}|{prompt_tokens}|{new_tokens}|{len(texts)}|{samples}|{seed}|"
                         f"{hashlib.sha256(''.join(texts).encode()).hexdigest()}".encode()).hexdigest()[:16]
    cache = cache_dir / f"seqkd-{key}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"][:prompt_tokens] for t in texts]
    prompts = [p for p in prompts if len(p) == prompt_tokens for _ in range(samples)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(teacher.parameters()).device
    torch.manual_seed(seed)
    outputs = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sequence-level KD (teacher generates)"):
        batch = torch.tensor(prompts[start:start + batch_size], device=device)
        out = teacher.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=samples > 1, top_k=0, top_p=1.0,
                               temperature=1.0, pad_token_id=pad)
        outputs.append(out[:, : prompt_tokens + new_tokens].cpu())
    sequences = torch.cat(outputs)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(sequences, tmp)
    tmp.replace(cache)
    return sequences


class DistillDataModule(L.LightningDataModule):
    def __init__(self, tokenizer: Any, seq_len: int, batch_size: int, data: str | None = None,
                 text_field: str = "text", val_windows: int = 8, extra_sequences: torch.Tensor | None = None,
                 seed: int = 0, grad_accum: int = 1):
        super().__init__()
        self.tokenizer, self.seq_len, self.batch_size = tokenizer, seq_len, batch_size
        self.data, self.text_field, self.val_windows = data, text_field, val_windows
        self.extra, self.seed, self.grad_accum = extra_sequences, seed, grad_accum
        self.train_blocks: torch.Tensor | None = None
        self.val_blocks: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is not None:
            return
        texts = load_split_or_file(self.data, "train", self.text_field)
        blocks = pack_blocks(tokenize_joined(self.tokenizer, texts), self.seq_len)
        if self.extra is not None:
            extra = self.extra[:, : self.seq_len]
            if extra.shape[1] == self.seq_len:
                blocks = torch.cat([blocks, extra])
        self.train_blocks = blocks
        self.val_blocks = heldout_windows(self.tokenizer, seq_len=512)[: self.val_windows]

    def train_dataloader(self) -> ShuffledBlocks:
        loader = ShuffledBlocks(self.train_blocks, self.batch_size, self.seed, self.grad_accum)
        loader.trainer = self.trainer
        return loader

    def val_dataloader(self) -> _Windows:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return _Windows(self.val_blocks, rank, world)
