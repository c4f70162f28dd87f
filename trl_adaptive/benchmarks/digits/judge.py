"""A judge for the `judge_filter` method: a reward model fitted to a separate, larger set of pairs labelled by the
same raters, as PickScore and HPS are fitted to Pick-a-Pic and HPD before anyone filters those datasets with them.

The judge's pairs are sampled from the base model like the benchmark's own (`build_pairs`) but for seeds from 200
on, which are neither reported seeds (0-) nor validation seeds (100-); by default their labels are the rater's own
(the majority preference: a reward model fitted to many raters' votes learns that), and `--judge-flip-rate` flips a
share of them to measure a weaker judge. It is a Bradley-Terry MLP on grey pixels and the prompt
(`fit_bradley_terry`), wrapped as a scorer (`PairJudge`) that `trl_adaptive.data.add_judge_scores` applies to the
run's pairs, the path a user takes with any reward model. How well it agrees with the raters is measured
(docs/results.md, "A judge you bring"), and the filter's judge check measures it again on the run's own labels.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from .settings import BenchmarkSettings

#: First seed of the judge's pair sets (`BenchmarkSettings.judge_seeds` of them, about 470 pairs each).
FIRST_JUDGE_SEED = 200


def fit_bradley_terry(winners: torch.Tensor, losers: torch.Tensor, context: torch.Tensor, hidden: int = 32,
                      weight_decay: float = 1e-3, steps: int = 300, seed: int = 0) -> torch.nn.Module:
    """A reward MLP r(image features, context) fitted by full-batch Adam to `-log sigmoid(r(winner) - r(loser))`."""
    generator = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(winners.shape[1] + context.shape[1], hidden), torch.nn.Tanh(),
                              torch.nn.Linear(hidden, 1))
    with torch.no_grad():
        for parameter in net.parameters():  # seeded here, so the judge does not depend on the global generator
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter.shape[-1] ** -0.5)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.softplus(-bradley_terry_margin(net, winners, losers, context)).mean().backward()
        optimizer.step()
    return net


def bradley_terry_margin(net: torch.nn.Module, winners: torch.Tensor, losers: torch.Tensor,
                         context: torch.Tensor) -> torch.Tensor:
    """r(winner) - r(loser) of every pair, shape (pairs, 1)."""
    return net(torch.cat([winners, context], 1)) - net(torch.cat([losers, context], 1))


def prompt_one_hot(prompts: list[str], prompt_index: dict[str, int]) -> torch.Tensor:
    """One-hot rows of each prompt's position in `prompt_index` (the judge's context input)."""
    unknown = sorted(set(prompts) - set(prompt_index))
    if unknown:
        raise ValueError(f"PairJudge was fitted without the prompts {unknown}")
    return torch.nn.functional.one_hot(torch.tensor([prompt_index[p] for p in prompts]), len(prompt_index)).float()


def grey_pixels(images) -> torch.Tensor:
    """PIL images as rows of grey levels in [0, 1]."""
    return torch.tensor(np.stack([np.asarray(i.convert("L"), dtype=np.float32).reshape(-1) / 255.0 for i in images]))


class PairJudge:
    """A fitted Bradley-Terry reward model as a scorer (`score(images, prompts)`, the interface of
    `trl_adaptive.evaluation`'s scorers): the reward of each grey image under its prompt (one-hot over the prompt
    texts it was fitted on)."""

    def __init__(self, net: torch.nn.Module, prompts: list[str]):
        self.net, self.prompt_index = net.eval(), {p: k for k, p in enumerate(prompts)}

    def context(self, prompts: list[str]) -> torch.Tensor:
        return prompt_one_hot(prompts, self.prompt_index)

    @torch.no_grad()
    def score(self, images, prompts: list[str]) -> torch.Tensor:
        return self.net(torch.cat([grey_pixels(images), self.context(list(prompts))], 1)).squeeze(1)


def judge_pairs(base, base_folder: str, rater, settings: BenchmarkSettings) -> dict:
    """The judge's pairs, unflipped: grey pixels of winners and losers (pairs, 64) and prompts, from the base model
    (pipeline `base`, saved in `base_folder`) and the rater as `build_pairs` makes them for the judge's seeds. Cached beside
    the base model's folder under a key of everything that decides them (sampling them takes a few minutes on one
    core)."""
    from .pairs import build_pairs

    seeds = range(FIRST_JUDGE_SEED, FIRST_JUDGE_SEED + settings.judge_seeds)
    base_folder = os.path.normpath(base_folder)
    cache_folder = os.path.dirname(base_folder)
    decided_by = {"base": os.path.basename(base_folder), "seeds": list(seeds), "rater": settings.rater, "rater_c": settings.rater_c,
                  "style": [settings.style_target, settings.style_width], "per_class": settings.samples_per_class,
                  "steps": settings.sampling_steps, "tie_gap": settings.tie_gap}
    key = hashlib.sha1(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_folder, f"judge-pairs-{settings.rater}-{key}.npz")
    if os.path.isfile(path):
        with np.load(path) as saved:
            return {"winners": torch.from_numpy(saved["winners"]), "losers": torch.from_numpy(saved["losers"]),
                    "prompts": [str(p) for p in saved["prompts"]]}
    winners, losers, prompts = [], [], []
    for seed in seeds:
        pairs, _ = build_pairs(base, rater, settings, seed)
        winners.append(grey_pixels(pairs["chosen"]))
        losers.append(grey_pixels(pairs["rejected"]))
        prompts.extend(pairs["prompt"])
    result = {"winners": torch.cat(winners), "losers": torch.cat(losers), "prompts": prompts}
    os.makedirs(cache_folder, exist_ok=True)
    np.savez(path + ".tmp.npz", winners=result["winners"].numpy(), losers=result["losers"].numpy(),
             prompts=np.array(prompts))
    os.replace(path + ".tmp.npz", path)  # whole or absent: a parallel worker never reads half a file
    return result


def fit_judge(pairs: dict, flip_rate: float, seed: int = 0, **fit_options) -> PairJudge:
    """The judge fitted to `pairs` (`judge_pairs`) with `flip_rate` of their labels flipped at random (`seed`), by
    `fit_bradley_terry` at its defaults, learned_judge.py's settings (not searched), unless `fit_options` say else."""
    winners, losers = pairs["winners"].clone(), pairs["losers"].clone()
    flip = torch.from_numpy(np.random.default_rng(seed).random(len(winners)) < flip_rate)
    winners[flip], losers[flip] = pairs["losers"][flip], pairs["winners"][flip]
    prompts = sorted(set(pairs["prompts"]))
    context = prompt_one_hot(pairs["prompts"], {p: k for k, p in enumerate(prompts)})
    return PairJudge(fit_bradley_terry(winners, losers, context, seed=seed, **fit_options), prompts)
