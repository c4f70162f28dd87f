"""Per-pair randomness that does not depend on how pairs are split over processes.

Diffusion-DPO draws, for every pair, a VAE posterior sample of each image, one Gaussian noise tensor and one
timestep (shared by winner and loser). Drawn from each process's global RNG, these depend on which process a pair
lands on and on its position in the local batch, so a run on N GPUs would see different noise than the same run
on one GPU with an N-times larger batch. Here every pair gets its own generator, seeded with a hash of

    (seed, purpose, step, row_index)

where `row_index` is the pair's row in the training set (added by `prepare_preference_dataset`), `step` the
optimizer step it is trained at (0 in evaluation) and `purpose` separates training from evaluation. Consequences:

* the same pairs at the same step get the same noise on any number of processes and any per-device batch size;
* noise is independent across pairs and across steps (a pair seen again in a later epoch gets fresh noise), because
  numpy's `SeedSequence` hashes the key into a well-mixed 64-bit seed;
* evaluation sees the same noise at every evaluation (its key has no step), so eval metrics are comparable;
* a resumed run needs no RNG state to reproduce its noise.

The cost is one small generator and a few tiny random kernels per pair, negligible next to a UNet forward.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

TRAIN, EVAL = 0, 1
_UINT64 = 2**64


def pair_generators(
    seed: int, step: int, row_index: torch.Tensor | list[int], device, purpose: int = TRAIN, draw: int = 0
) -> list[torch.Generator]:
    """One generator per pair, seeded from (seed, purpose, step, row_index) and, for extra draws of the same pairs
    at the same step (the minority filter's `minority_evidence_draws`), the draw number. The seeds are made on the
    host: pass the rows as a list (the collators' ``row_index_list``); a GPU tensor is read back, a wait per step."""
    generators = []
    rows = row_index.reshape(-1).tolist() if isinstance(row_index, torch.Tensor) else list(row_index)
    for row in rows:
        key = [int(v) % _UINT64 for v in (seed, purpose, step, row) + ((draw,) if draw else ())]
        state = np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0]
        generators.append(torch.Generator(device=device).manual_seed(int(state)))
    return generators


def pair_noise_and_timesteps(
    family, generators: list[torch.Generator], latents_shape: torch.Size, device, dtype, min_noise: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise of shape `latents_shape` (one row per pair) and one timestep per pair, each row from its generator
    (timesteps from the noisiest `1 - min_noise` share of the schedule)."""
    noise = randn_tensor(tuple(latents_shape), generator=generators, device=torch.device(device), dtype=dtype)
    timesteps = torch.cat([family.sample_timesteps(1, device, generator=g, min_noise=min_noise) for g in generators])
    return noise, timesteps
