"""The digits benchmark's settings: every knob of one run (`BenchmarkSettings`, `quick_settings`) and the
constants shared across the package (digit words, prompt templates, the base model's cache version)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .methods import FILTER_OVERRIDES


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Templates the base model is pretrained on. The preference pairs use the first two; evaluation uses the third,
#: so the evaluation prompts are held out from preference training.
PRETRAIN_TEMPLATES = ("a handwritten digit {}", "the digit {}", "a handwritten {}")
PAIR_TEMPLATES = PRETRAIN_TEMPLATES[:2]
EVAL_TEMPLATE = PRETRAIN_TEMPLATES[2]
BASE_MODEL_VERSION = "digits-base-v1"


@dataclass
class BenchmarkSettings:
    """Every knob of one benchmark run (the defaults are the full grid; `quick()` the CI smoke size)."""

    flip_rates: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    methods: tuple[str, ...] = ("dpo", "cdpo", "adaptive", "adaptive_amortised", "capped", "contrast_filter",
                                "filter_free", "oracle")
    #: Pretraining phases (steps, batch); each phase restarts a one-cycle lr schedule (peak 2e-3) with seed = its
    #: index. Measured: after (400, 128) samples were 21% correct for the rater; after a second (1200, 64) phase 92%.
    pretrain_phases: tuple[tuple[int, int], ...] = ((400, 128), (1200, 64))
    samples_per_class: int = 100  # base samples per digit; paired within digit and template (50 pairs per digit)
    tie_gap: float = 0.02  # pairs whose reward gap is below this are dropped as near-ties
    #: 300 steps of 32 pairs = ~20 visits per pair. At 150 steps (~10 visits) the filter's evidence was too noisy to
    #: beat Diffusion-DPO reliably on validation seeds (docs/results.md, "How the settings were chosen").
    train_steps: int = 300
    train_batch: int = 32
    learning_rate: float = 1e-4
    #: 100 puts the digits model where SD-sized models are at the field's beta: `beta |l|` near 1 (the logistic
    #: regime). Chosen on validation seeds 100-101 over 30-2500; 2500, the diffusers script's value, gives a hinge
    #: regime (`beta |l|` in the tens) in which flipped labels do far more damage (docs/results.md, "The beta regime").
    beta: float = 100.0
    eval_samples_per_class: int = 30
    sampling_steps: int = 20
    rater_c: float = 0.05
    #: Which rater ranks the preference pairs and rates the runs (`--rater`): "fidelity", the probability of the
    #: prompted digit (logistic regression, `rater_c`), or "style", the ink mass standardised within the prompted
    #: digit's class, scored against the class's typical stroke weight (`StyleRater`); with "style" the fidelity
    #: reward is reported
    #: beside it.
    rater: str = "fidelity"
    #: The style rater's reward exp(-(z - target)^2 / (2 width^2)) of the standardised ink z (docs/results.md, "The
    #: style rater").
    style_target: float = 0.0
    style_width: float = 0.5
    #: The `judge_filter` method's judge (judge.py): a reward model fitted to this many separate pair sets (seeds 200..,
    #: about 470 pairs each) of the same rater, with this share of their labels flipped (0: the rater's own labels,
    #: the majority preference, as a reward model fitted to many raters learns it).
    judge_seeds: int = 16
    judge_flip_rate: float = 0.0
    #: (flipped, clean) shares that the drop diagnostics remove from the filter's warm-up on (`--drop-shares`); None:
    #: MATCHED_DROP_SHARES, the shares the minority filter dropped at beta 2500.
    drop_shares: tuple[float, float] | None = None
    #: AdaptiveDPOConfig fields of the 'filter' method (FILTER_OVERRIDES plus any --set).
    filter_overrides: dict = field(default_factory=lambda: dict(FILTER_OVERRIDES))
    #: Extra AdaptiveDPOConfig fields per method (`--set-method METHOD:FIELD=VALUE`), applied after its overrides.
    method_overrides: dict = field(default_factory=dict)


def quick_settings() -> BenchmarkSettings:
    return BenchmarkSettings(
        flip_rates=(0.0, 0.2),
        pretrain_phases=((60, 64),),
        samples_per_class=24,
        train_steps=12,
        train_batch=32,
        eval_samples_per_class=6,
        sampling_steps=10,
    )
