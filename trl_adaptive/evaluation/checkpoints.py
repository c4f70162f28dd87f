"""The authors' reward-model checkpoints, converted to maintained transformers modules when they are loaded.

HPSv2 and ImageReward ship as raw PyTorch state dicts of their own code bases (OpenCLIP for HPSv2, BLIP for
ImageReward), whose packages pin old dependencies and, for OpenCLIP, need a torchvision that fails to load beside
this project's CPU torch. Their networks are architectures transformers implements (CLIP, and BLIP's ViT and
cross-attention BERT), so the weights are renamed onto those: no forward is re-implemented here. The architecture is
read from the tensors' shapes; only the attention head widths are not in the shapes and are the authors' (80 for
OpenCLIP ViT-H/14's vision tower, 64 elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

#: OpenCLIP ViT-H/14 (HPSv2's backbone): its vision tower uses 80-wide heads, its text tower 64-wide ones.
OPEN_CLIP_HEAD_WIDTHS = {"vision": 80, "text": 64}
#: BLIP's ViT and BERT both use 64-wide heads.
BLIP_HEAD_WIDTH = 64
#: ImageReward's reward normalisation (the constants its release divides by), so scores read as in its paper.
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072


def _strip(state_dict: dict, prefix: str = "module.") -> dict:
    """Drop the DistributedDataParallel prefix a checkpoint saved from a wrapped model carries."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def _layer_count(state_dict: dict, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    if not indices:
        raise ValueError(f"checkpoint has no layers under {prefix!r}: not the expected architecture")
    return max(indices) + 1


def _load_exactly(build, state_dict: dict, what: str) -> nn.Module:
    """`build()`'s module with all of `state_dict` and nothing less in it. The module is built without allocating its
    weights (the checkpoint's tensors are assigned), so a 1 B-parameter scorer is not held twice while loading."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device; buffers (position ids) real
        module = build()
    missing, unexpected = module.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{what}: checkpoint does not match the architecture; missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return module


# ---- OpenCLIP -> transformers CLIPModel (HPSv2) ----------------------------------------------------------------


def _open_clip_block(remaining: dict, source: str, target: str, out: dict) -> None:
    """One OpenCLIP residual attention block (fused q/k/v of nn.MultiheadAttention) onto a CLIPEncoderLayer."""
    for kind in ("weight", "bias"):
        for name, part in zip(("q_proj", "k_proj", "v_proj"), remaining.pop(f"{source}.attn.in_proj_{kind}").chunk(3)):
            out[f"{target}.self_attn.{name}.{kind}"] = part.clone()  # its own storage: save_pretrained refuses views
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[f"{target}.{ours}.{kind}"] = remaining.pop(f"{source}.{theirs}.{kind}")


def open_clip_config(state_dict: dict, head_widths: dict | None = None):
    """The transformers `CLIPConfig` of an OpenCLIP ViT checkpoint, read from its tensor shapes."""
    from transformers import CLIPConfig

    head_widths = head_widths or OPEN_CLIP_HEAD_WIDTHS
    state_dict = _strip(state_dict)
    vision_width = state_dict["visual.class_embedding"].shape[-1]
    patch = state_dict["visual.conv1.weight"].shape[-1]
    grid = int(round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    vocab, text_width = state_dict["token_embedding.weight"].shape
    vision = dict(
        hidden_size=vision_width, intermediate_size=state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_layer_count(state_dict, "visual.transformer.resblocks."),
        num_attention_heads=vision_width // head_widths["vision"], patch_size=patch, image_size=grid * patch,
        hidden_act="gelu",  # OpenCLIP's nn.GELU; the OpenAI models' quick_gelu is not used by ViT-H/14
    )
    text = dict(
        hidden_size=text_width, intermediate_size=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_layer_count(state_dict, "transformer.resblocks."),
        num_attention_heads=text_width // head_widths["text"], vocab_size=vocab,
        max_position_embeddings=state_dict["positional_embedding"].shape[0], hidden_act="gelu",
        # OpenCLIP pools at the end-of-text token, the largest id of its vocabulary (argmax of the token ids).
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=state_dict["visual.proj"].shape[1])


#: OpenCLIP names -> transformers CLIPModel names, outside the transformer blocks (``*``: transposed, since OpenCLIP
#: multiplies ``x @ proj`` where nn.Linear computes ``x @ weight.T``).
_OPEN_CLIP_NAMES = {
    "logit_scale": "logit_scale",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight*",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight*",
}


def clip_from_open_clip(state_dict: dict, head_widths: dict | None = None):
    """A transformers `CLIPModel` holding an OpenCLIP ViT checkpoint's weights (HPSv2's ``state_dict``)."""
    from transformers import CLIPModel

    state_dict = _strip(state_dict)
    remaining = {k: v for k, v in state_dict.items() if not k.endswith("attn_mask")}  # a buffer, rebuilt by CLIP
    converted = {}
    for theirs, ours in _OPEN_CLIP_NAMES.items():
        tensor = remaining.pop(theirs)
        converted[ours.rstrip("*")] = tensor.t().contiguous() if ours.endswith("*") else tensor
    for tower, source in (("text_model", "transformer"), ("vision_model", "visual.transformer")):
        for i in range(_layer_count(state_dict, f"{source}.resblocks.")):
            _open_clip_block(remaining, f"{source}.resblocks.{i}", f"{tower}.encoder.layers.{i}", converted)
    if remaining:
        raise ValueError(f"OpenCLIP checkpoint has weights this conversion does not know: {sorted(remaining)[:8]}")
    config = open_clip_config(state_dict, head_widths)
    return _load_exactly(lambda: CLIPModel(config), converted, "OpenCLIP -> CLIPModel").eval()


# ---- BLIP (ImageReward) -> transformers BlipVisionModel + BlipTextModel ------------------------------------------


class ImageRewardModel(nn.Module):
    """ImageReward's network on transformers' BLIP: the ViT's tokens cross-attended by the prompt's BERT, the [CLS]
    feature through the MLP head, normalised by the release's mean and std."""

    def __init__(self, vision_model: nn.Module, text_encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.vision_model, self.text_encoder, self.head = vision_model, text_encoder, head

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                                 encoder_attention_mask=image_mask, is_decoder=False)  # bidirectional, as BLIP's ITM
        reward = self.head(text.last_hidden_state[:, 0, :].float())
        return (reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def _blip_vision_state(state_dict: dict, source: str) -> dict:
    """BLIP's timm-style ViT names onto transformers' BlipVisionModel (the fused qkv layout is the same)."""
    out = {
        "embeddings.class_embedding": state_dict[f"{source}.cls_token"],
        "embeddings.position_embedding": state_dict[f"{source}.pos_embed"],
        "embeddings.patch_embedding.weight": state_dict[f"{source}.patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": state_dict[f"{source}.patch_embed.proj.bias"],
        "post_layernorm.weight": state_dict[f"{source}.norm.weight"],
        "post_layernorm.bias": state_dict[f"{source}.norm.bias"],
    }
    for i in range(_layer_count(state_dict, f"{source}.blocks.")):
        for ours, theirs in (("layer_norm1", "norm1"), ("self_attn.qkv", "attn.qkv"), ("self_attn.projection", "attn.proj"),
                             ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for kind in ("weight", "bias"):
                out[f"encoder.layers.{i}.{ours}.{kind}"] = state_dict[f"{source}.blocks.{i}.{theirs}.{kind}"]
    return out


def imagereward_from_checkpoint(state_dict: dict) -> ImageRewardModel:
    """ImageReward's release (``ImageReward.pt``: ``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.*``) as an
    `ImageRewardModel`; the BLIP projection heads it also holds are not used for the reward and are left out."""
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    from .scorers import AestheticHead  # the same five-layer MLP (Linear / Dropout names), ImageReward's head too

    state_dict = _strip(state_dict)
    vision_source, text_source = "blip.visual_encoder", "blip.text_encoder."
    vision_state = _blip_vision_state(state_dict, vision_source)
    width = vision_state["embeddings.class_embedding"].shape[-1]
    patch = vision_state["embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round((vision_state["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    vision_config = BlipVisionConfig(
        hidden_size=width, intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_layer_count(state_dict, f"{vision_source}.blocks."), num_attention_heads=width // BLIP_HEAD_WIDTH,
        patch_size=patch, image_size=grid * patch, layer_norm_eps=1e-6,  # timm's ViT LayerNorm, as BLIP builds it
    )  # fmt: skip
    text_state = {k[len(text_source):]: v for k, v in state_dict.items() if k.startswith(text_source)}
    vocab, hidden = text_state["embeddings.word_embeddings.weight"].shape
    text_config = BlipTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=text_state["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_layer_count(text_state, "encoder.layer."), num_attention_heads=hidden // BLIP_HEAD_WIDTH,
        encoder_hidden_size=text_state["encoder.layer.0.crossattention.self.key.weight"].shape[1],
        max_position_embeddings=text_state["embeddings.position_embeddings.weight"].shape[0], layer_norm_eps=1e-12,
        bos_token_id=None, sep_token_id=None, pad_token_id=0,
    )  # fmt: skip
    head_state = {k[len("mlp."):]: v for k, v in state_dict.items() if k.startswith("mlp.")}
    vision = _load_exactly(lambda: BlipVisionModel(vision_config), vision_state, "ImageReward visual encoder")
    text = _load_exactly(lambda: BlipTextModel(text_config, add_pooling_layer=False), text_state, "ImageReward text encoder")
    head = _load_exactly(lambda: AestheticHead(hidden), head_state, "ImageReward MLP head")
    return ImageRewardModel(vision, text, head).eval()
