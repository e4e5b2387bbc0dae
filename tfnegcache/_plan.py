"""How the sampler cuts a cache into blocks (its first stage draws a block) and chunks (a
tile scored at once): pure Python, shared by both front ends (`tfnegcache.scoring` and
`tfnegcache.keras3.scoring` re-export it)."""

import dataclasses
import math
from typing import Optional

# Elements of the `[B, chunk]` score tile scored at once: 2^20 float32 is 4 MiB, small enough
# that the tile stays in cache across the matmul and the logsumexp passes (2^22 was ~1.5x
# slower per score on a 2-core CPU; see benchmarks/sampler.py).
DEFAULT_TILE_ELEMENTS = 2**20


@dataclasses.dataclass(frozen=True)
class SamplerPlan:
    """How `sample_cache` cuts `num_slots` into blocks (sampling) and chunks (scoring).

    Attributes:
      num_slots: N, the number of cache slots.
      block_size: b, slots per sampling block. Two-stage sampling draws `N / b` block noises
        and then re-scores the chosen block's `b` slots per draw, so `b ~ sqrt(N / (d + 1))`
        balances the two.
      blocks_per_chunk: blocks scored per tile; a tile is `[B, blocks_per_chunk * b]`.
      num_blocks: `ceil(N / b)`.
      num_chunks: `ceil(num_blocks / blocks_per_chunk)`.
    """

    num_slots: int
    block_size: int
    blocks_per_chunk: int

    @property
    def num_blocks(self) -> int:
        return -(-self.num_slots // self.block_size)

    @property
    def chunk_size(self) -> int:
        return self.block_size * self.blocks_per_chunk

    @property
    def num_chunks(self) -> int:
        return -(-self.num_blocks // self.blocks_per_chunk)


def plan_sampler(
    num_slots: int,
    embedding_dim: int,
    num_queries: Optional[int],
    block_size: Optional[int] = None,
    tile_elements: int = DEFAULT_TILE_ELEMENTS,
    num_heads: int = 1,
) -> SamplerPlan:
    """Chooses block and chunk sizes from the shapes.

    Args:
      num_slots: N.
      embedding_dim: d.
      num_queries: B if static, else None (then 512 is assumed for the memory budget).
      block_size: force b (tests use this); else the power of two nearest
        `sqrt(N / (H d + 1))` (re-scoring a slot in stage 2 costs `H d`).
      tile_elements: the largest `B * H * chunk` score tile to hold at once.
      num_heads: H, heads per query (`[B, H, d]` queries); 1 for `[B, d]`.

    Returns:
      A `SamplerPlan`.
    """
    if num_slots < 1:
        raise ValueError(f"`num_slots` must be >= 1. Received: num_slots={num_slots}.")
    if block_size is None:
        ideal = math.sqrt(num_slots / (num_heads * embedding_dim + 1))
        block_size = 2 ** max(0, round(math.log2(max(ideal, 1.0))))
    block_size = int(min(max(block_size, 1), num_slots))
    num_blocks = -(-num_slots // block_size)
    rows = (num_queries or 512) * num_heads
    blocks_per_chunk = max(1, tile_elements // (rows * block_size))
    return SamplerPlan(num_slots, block_size, int(min(blocks_per_chunk, num_blocks)))
