"""The model card (README.md) written with every checkpoint and final save."""

from __future__ import annotations

import os

DIFFUSION_DPO_CITATION = """@inproceedings{wallace2024diffusion,
  title     = {Diffusion Model Alignment Using Direct Preference Optimization},
  author    = {Wallace, Bram and Dang, Meihua and Rafailov, Rafael and Zhou, Linqi and Lou, Aaron and
               Purushwalkam, Senthil and Ermon, Stefano and Xiong, Caiming and Joty, Shafiq and Naik, Nikhil},
  booktitle = {CVPR},
  year      = {2024},
  note      = {arXiv:2311.12908}
}"""

ADAPTIVE_DPO_CITATION = """@article{zhang2025preferences,
  title   = {When Preferences Diverge: Aligning Diffusion Models with Minority-Aware Adaptive DPO},
  author  = {Zhang, Lingfan and Liu, Chen and others},
  journal = {arXiv preprint arXiv:2503.16921},
  year    = {2025}
}"""

CARD_HYPERPARAMETERS = (
    "beta", "loss_type", "label_smoothing", "misranked_weight", "adaptive", "annotator_decays", "metric_rho",
    "metric_normalize", "metric_warmup_steps", "weight_fn", "weight_scale", "weight_intercept", "margin", "margin_scale",
    "minority_filter", "minority_evidence", "minority_filter_threshold", "minority_filter_max_fraction", "resolution",
    "drop_ties", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
    "num_train_epochs", "seed",
)


#: What the model card says about the minority filter (trl-adaptive's option, not in the papers), by its evidence.
MINORITY_FILTER_SENTENCES = {
    "prompt_contrast": "Pairs were dropped while the reference model, judging which image fits the prompt better, "
    "contradicted their label on most of its votes (trl-adaptive's minority filter with `prompt_contrast` evidence).",
    **{kind: "Pairs were dropped while the model being trained ranked them against their label across their visits "
       "(trl-adaptive's minority filter)." for kind in ("wrong_sign", "logit")},
    "judge": "Pairs were dropped where a judge's scores of the two images (a reward model's, in the data's "
    "`judge_scores` column) preferred the labelled loser (trl-adaptive's minority filter with `judge` evidence).",
    "score": "Pairs were dropped while their Adaptive-DPO minority score, averaged over their visits, marked them as "
    "minority labels (trl-adaptive's minority filter).",
}


def hub_model_id(name: str | None) -> str | None:
    """`name` if it can be a Hub repository id, else None. The Hub rejects a push whose card metadata names a local
    folder as `base_model`, so a model loaded from disk is named in the text only."""
    if not name or os.path.exists(name):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def build_model_card(
    args,
    base_model: str | None,
    dataset_name: str | None,
    pipeline_class: str,
    lora_rank: int | None,
    global_step: int,
    dataset_info: dict | None = None,
    tags: tuple[str, ...] = (),
    denoiser_class: str = "UNet2DConditionModel",
) -> str:
    method = "Adaptive-DPO (minority-aware Diffusion-DPO)" if args.adaptive else "Diffusion-DPO"
    weights = f"LoRA (rank {lora_rank}) on the {denoiser_class}" if lora_rank else f"full fine-tune of the {denoiser_class}"
    loading = (
        f"pipe = {pipeline_class}.from_pretrained({base_model!r})\npipe.load_lora_weights(\"<this repo or folder>\")"
        if lora_rank
        else f"pipe = {pipeline_class}.from_pretrained(\"<this repo or folder>\")"
    )
    rows = "\n".join(f"| `{name}` | `{getattr(args, name, None)}` |" for name in CARD_HYPERPARAMETERS)
    data_line = f"`{dataset_name}`" if dataset_name else "a user-supplied preference dataset"
    if dataset_info and dataset_info.get("streamed"):
        pairs = f", {dataset_info['num_rows']} pairs used" if dataset_info.get("num_rows") is not None else ""
        data_line += (f" ({dataset_info['schema']} schema, streamed{pairs}, ties "
                      f"{'dropped' if dataset_info['ties_dropped'] else 'kept'})")
    elif dataset_info:
        data_line += (
            f" ({dataset_info['schema']} schema, {dataset_info['num_rows']} pairs used, {dataset_info['num_ties']} ties"
            f" {'dropped' if dataset_info['ties_dropped'] else 'kept'})"
        )
    front_matter = "\n".join(
        ["---"]
        + ([f"base_model: {hub_model_id(base_model)}"] if hub_model_id(base_model) else [])
        + ["library_name: diffusers", "tags:"]
        + [f"- {t}" for t in ("text-to-image", "diffusers", "trl-adaptive", *tags)]
        + ["---"]
    )
    return f"""{front_matter}

# {method} of {base_model or 'a diffusion model'}

This model was preference-tuned with [trl-adaptive](https://github.com/trl-adaptive/trl-adaptive) using
{method}: a {weights} of `{base_model or 'the base model'}` trained for {global_step} optimizer steps on {data_line}.

```python
from diffusers import {pipeline_class}
{loading}
image = pipe("a photo of a cat").images[0]
```

## Method

Winner and loser images share noise and timestep; the Diffusion-DPO logit is `l = (r_w - r_l) - (m_w - m_l)`
(reference minus policy denoising errors) and the loss is `-log sigmoid(beta * l)` (no 0.5 factor: beta 2500
here equals 5000 in the original Diffusion-DPO code).
{"Adaptive-DPO scores each pair with a minority metric u from the current model and its EMA copies, then trains on "
 "`-W(u) log sigmoid(beta * l - gamma(u))`, down-weighting likely minority (mislabelled or idiosyncratic) pairs."
 if args.adaptive else ""}
{MINORITY_FILTER_SENTENCES.get(args.minority_evidence, "") if args.minority_filter != "none" else ""}

## Training hyperparameters

| option | value |
| --- | --- |
{rows}

## Citations

```bibtex
{DIFFUSION_DPO_CITATION}

{ADAPTIVE_DPO_CITATION}
```
"""
