"""Training-run checkpoints written by the real libraries, for tests and the benchmark.

Run as a script under ``torchrun`` (``--nproc_per_node 2``, gloo on CPU) or as a
plain process (one rank); it writes, each in a folder of its own under OUT:

- ``ds-z{1,2,3}-w{N}``: DeepSpeed ZeRO stage 1/2/3 (``DS_ACCELERATOR=cpu``) checkpoints of
  :class:`TinyLM` (a tied embedding, a frozen parameter, float and integer buffers),
  after one optimizer step, saved with ``engine.save_checkpoint``;
- ``dcp-rows``/``dcp-cols`` (two ranks only): FSDP2 ``fully_shard`` + ``dcp.save`` of a tiny
  tied Llama (its ``config.json`` beside), parameters sharded by rows (the default) or by
  columns (``shard_placement_fn``), with the optimizer state, as torchtitan saves them.

Each folder also gets ``reference.pt``: the model's own ``state_dict()`` (rank 0), to load the
conversion into and compare outputs. ``--only`` picks fixtures; ``--size-mb`` scales TinyLM
(the benchmark's 1 GB run).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn


class TinyLM(nn.Module):
    """A language model in miniature: tied embedding and head, a frozen parameter, buffers.

    Sizes are odd on purpose (97 x 22 embedding, 37 hidden): ZeRO pads partitions.
    """

    def __init__(self, vocab: int = 97, dim: int = 22, hidden: int = 37, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(16, dim) * 0.02, requires_grad=False)  # frozen
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((3,), 0.5))
        self.register_buffer("steps", torch.tensor([7, 11], dtype=torch.int64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[-1]]
        for block in self.blocks:
            x = x + block(x) * self.scale[0]
        return self.head(self.norm(x))


def _sizes_for(mb: int) -> dict[str, int]:
    # fp32 weights of about ``mb`` MB: 8 layers of dim x 4dim x 2 plus a 4096-word embedding
    dim = 512
    while 4 * (8 * 8 * dim * dim + 4096 * dim) < mb * 10**6:
        dim += 128
    return {"vocab": 4096, "dim": dim, "hidden": 4 * dim + 1, "layers": 8}


def _batch(vocab: int, rank: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(100 + rank))


def deepspeed_fixture(
    out: Path, stage: int, sizes: dict[str, int], rank: int, world: int, steps: int = 1, reference: bool = True
) -> None:
    import deepspeed

    torch.manual_seed(0)
    model = TinyLM(**sizes)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    for _ in range(steps):
        ids = _batch(sizes.get("vocab", 97), rank)
        loss = engine(ids).float().logsumexp(-1).mean()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(out))
    if not reference:
        engine.destroy()
        return
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    else:
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        torch.save(state, out / "reference.pt")
    torch.distributed.barrier()
    engine.destroy()


def _llama(sizes: dict[str, int] | None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=(sizes or {}).get("vocab", 97),
        hidden_size=(sizes or {}).get("dim", 32),
        intermediate_size=(sizes or {}).get("hidden", 37),
        num_hidden_layers=(sizes or {}).get("layers", 2),
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def dcp_fixture(
    out: Path, placement: str, rank: int, nest: str, sizes: dict[str, int] | None = None, reference: bool = True
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    model = _llama(sizes)
    if rank == 0:
        model.config.architectures = ["LlamaForCausalLM"]  # as save_pretrained records it
        model.config.save_pretrained(out)
    world = torch.distributed.get_world_size()

    def by_columns(p: nn.Parameter) -> Shard:  # FSDP2 shards dim 1 only evenly
        return Shard(1) if p.ndim > 1 and p.shape[1] % world == 0 else Shard(0)

    placement_fn = by_columns if placement == "cols" else None
    for layer in model.model.layers:
        fully_shard(layer, shard_placement_fn=placement_fn)
    fully_shard(model, shard_placement_fn=placement_fn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = _batch(model.config.vocab_size, rank)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    if nest:
        state = {nest: state}
    dcp.save(state, checkpoint_id=str(out))
    if not reference:
        return
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, out / "reference.pt")
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", default="")
    parser.add_argument("--size-mb", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true", help="skip reference.pt (the benchmark's inputs)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:  # a plain process: one rank of its own
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 200))
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    only = set(filter(None, args.only.split(",")))
    sizes = _sizes_for(args.size_mb) if args.size_mb else {}
    for stage in (1, 2, 3):
        name = f"ds-z{stage}-w{world}"
        if not only or name in only:
            folder = args.out / name
            folder.mkdir(parents=True, exist_ok=True)
            deepspeed_fixture(folder, stage, sizes, rank, world, reference=not args.no_reference)
    if world > 1:
        for placement, nest in (("rows", ""), ("cols", "app")):
            name = f"dcp-{placement}"
            if not only or name in only:
                folder = args.out / name
                folder.mkdir(parents=True, exist_ok=True)
                # Llama's layers hold about twice TinyLM's: half as many give the same weight bytes.
                llama_sizes = (
                    None if not sizes else {"vocab": 4096, "dim": sizes["dim"], "hidden": sizes["hidden"], "layers": 4}
                )
                dcp_fixture(folder, placement, rank, nest, llama_sizes, reference=not args.no_reference)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
