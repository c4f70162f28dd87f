"""The paper's flipped-label experiment, offline, on scikit-learn's 8x8 handwritten digits.

Pipeline (each step documented where it is implemented):

1. **Base model** (``base_model.py``): a pixel-space ``StableDiffusionPipeline`` (``vae=None``: a small
   ``UNet2DConditionModel`` on 8x8 images, a small ``CLIPTextModel`` and the offline character-level CLIP tokenizer),
   pretrained here on half of ``load_digits`` with prompts such as "a handwritten digit seven". Cached in a folder and
   reused.
2. **Rater** (``rater.py``): logistic regression (deliberately soft, C=0.05) trained on the *other* half of the real
   digits; the reward of an image is the probability of the prompted digit. It never sees the policy's weights.
3. **Pairs** (``pairs.py``): images sampled from the base model per prompt; the higher-reward image wins; near-ties
   dropped. ``flip_labels`` flips 0/10/20/30% of them (the paper's synthetic minority).
4. **Methods at equal budgets** (``methods.py``, trained by ``runner.py``; same steps, batch and learning rate), all
   trained by ``AdaptiveDiffusionDPOTrainer`` with a full fine-tune: Diffusion-DPO, cDPO (label_smoothing = flip
   rate), Adaptive-DPO as the paper defines it, its amortised mode (``annotator_interval``), the minority filter of
   this library (``minority_filter``, settings in ``FILTER_OVERRIDES``, chosen on validation seeds 100-101 at beta
   2500), and the oracle (Diffusion-DPO on the unflipped pairs only). Every method runs at ``BenchmarkSettings.beta``
   (``settings.py``).
5. **Evaluation** (``evaluation.py``, ``statistics.py``, ``report.py``) on held-out generation seeds and a prompt
   template the preference data never used: mean rater reward, win rate against the base model paired by prompt and
   seed, and how well each method's per-pair minority evidence finds the flipped pairs (AUROC, flipped share per
   decile).

Results, setup details and the validation sweep: docs/results.md.

``main(argv)`` is the command line (``cli.py``; ``trl-adaptive demo`` / ``python -m trl_adaptive.demo``). This
package re-exports every name of the former single module, so ``digits.<name>`` keeps working.
"""

from .base_model import build_base_pipeline, encode_prompts, load_base, load_or_pretrain_base, pretrain_base, sample_images
from .cli import _parse_override, main, parse_args, settings_from_args
from .evaluation import evaluation_set, prompt_set, rate_unet
from .methods import (
    CONTRAST_FILTER_OVERRIDES,
    DIAGNOSTIC_METHODS,
    EVIDENCE_CHOSEN_GROUPS,
    FILTER_OVERRIDES,
    FILTER_WARMUP_SHARE,
    MATCHED_DROP_SHARES,
    METHOD_LABELS,
    SAMPLED_METHODS,
    method_config,
    method_overrides,
    runs_for,
)
from .pairs import PairLogits, build_pairs, flipped_pair_set
from .rater import DigitRater, split_digits, to_uint8
from .recording import _recording_trainer_class
from .report import make_plots, markdown_table, merge_reports, write_report
from .runner import _quiet_libraries, _quiet_worker, run_one, run_seed, train_method
from .settings import (
    BASE_MODEL_VERSION,
    DIGIT_WORDS,
    EVAL_TEMPLATE,
    PAIR_TEMPLATES,
    PRETRAIN_TEMPLATES,
    BenchmarkSettings,
    quick_settings,
)
from .statistics import auroc, decile_shares, detection_metrics, mean_ci, method_at, per_pair_means, summarise

__all__ = [
    # settings.py
    "BASE_MODEL_VERSION", "DIGIT_WORDS", "EVAL_TEMPLATE", "PAIR_TEMPLATES", "PRETRAIN_TEMPLATES", "BenchmarkSettings",
    "quick_settings",
    # methods.py
    "CONTRAST_FILTER_OVERRIDES", "DIAGNOSTIC_METHODS", "EVIDENCE_CHOSEN_GROUPS", "FILTER_OVERRIDES",
    "FILTER_WARMUP_SHARE", "MATCHED_DROP_SHARES", "METHOD_LABELS", "SAMPLED_METHODS", "method_config",
    "method_overrides", "runs_for",
    # rater.py
    "DigitRater", "split_digits", "to_uint8",
    # base_model.py
    "build_base_pipeline", "encode_prompts", "load_base", "load_or_pretrain_base", "pretrain_base", "sample_images",
    # pairs.py
    "PairLogits", "build_pairs", "flipped_pair_set",
    # evaluation.py
    "evaluation_set", "prompt_set", "rate_unet",
    # recording.py
    "_recording_trainer_class",
    # runner.py
    "_quiet_libraries", "_quiet_worker", "run_one", "run_seed", "train_method",
    # statistics.py
    "auroc", "decile_shares", "detection_metrics", "mean_ci", "method_at", "per_pair_means", "summarise",
    # report.py
    "make_plots", "markdown_table", "merge_reports", "write_report",
    # cli.py
    "_parse_override", "main", "parse_args", "settings_from_args",
]
