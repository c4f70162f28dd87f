"""HPSv2 and ImageReward: the authors' checkpoint layouts converted onto transformers' CLIP and BLIP give the
outputs of reference networks written the way OpenCLIP and BLIP (timm's ViT) write them, and each scorer's
preprocessing is its authors' transform, checked by hand on images whose sizes exercise the rounding."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from trl_adaptive.evaluation.checkpoints import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    clip_from_open_clip,
    imagereward_from_checkpoint,
    open_clip_config,
)
from trl_adaptive.evaluation.scorers import (
    CLIP_MEAN,
    CLIP_STD,
    load_scorer,
    normalized_pixels,
    resize_and_center_crop,
    resize_longer_side_and_pad,
)
from trl_adaptive.tiny import (
    _random_state,
    imagereward_state_shapes,
    open_clip_state_shapes,
    tiny_hpsv2_checkpoint,
    tiny_imagereward_checkpoint,
)

# ---- reference networks, in the authors' module layout (their state_dict names are the checkpoints' names) ---------


class OpenClipBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Tower(nn.Module):
    def __init__(self, width, heads, layers):
        super().__init__()
        self.resblocks = nn.ModuleList(OpenClipBlock(width, heads) for _ in range(layers))


class OpenClipReference(nn.Module):
    """OpenCLIP's ViT CLIP forward: class token, ln_pre, blocks, ln_post of the class token @ proj; text: causal
    blocks, ln_final, the end-of-text token (argmax of the ids) @ text_projection."""

    def __init__(self, shapes):
        super().__init__()
        vision_width, patch = shapes["visual.conv1.weight"][0], shapes["visual.conv1.weight"][-1]
        text_width = shapes["token_embedding.weight"][1]
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, vision_width, patch, patch, bias=False)
        self.visual.class_embedding = nn.Parameter(torch.zeros(vision_width))
        self.visual.positional_embedding = nn.Parameter(torch.zeros(shapes["visual.positional_embedding"]))
        self.visual.ln_pre, self.visual.ln_post = nn.LayerNorm(vision_width), nn.LayerNorm(vision_width)
        self.visual.transformer = Tower(vision_width, vision_width // 80, 1)
        self.visual.proj = nn.Parameter(torch.zeros(shapes["visual.proj"]))
        self.token_embedding = nn.Embedding(*shapes["token_embedding.weight"])
        self.positional_embedding = nn.Parameter(torch.zeros(shapes["positional_embedding"]))
        self.transformer = Tower(text_width, text_width // 64, 1)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.zeros(shapes["text_projection"]))
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def encode_image(self, pixels):
        x = self.visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + self.visual.positional_embedding
        x = self.visual.ln_pre(x)
        for block in self.visual.transformer.resblocks:
            x = block(x)
        return self.visual.ln_post(x[:, 0]) @ self.visual.proj

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
        for block in self.transformer.resblocks:
            x = block(x, mask)
        return self.ln_final(x)[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection


class TimmVitBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.attn.proj((attention @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class BlipVitReference(nn.Module):
    """BLIP's ViT (timm's layout): patch embedding, class token, positions, pre-norm blocks, final norm of all tokens."""

    def __init__(self, width, patch, tokens, layers=1):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
        self.blocks = nn.ModuleList(TimmVitBlock(width, width // 64) for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ---- conversions -------------------------------------------------------------------------------------------------


def test_open_clip_conversion_matches_the_open_clip_forward():
    shapes = open_clip_state_shapes()
    state = _random_state(shapes, seed=3)
    reference = OpenClipReference(shapes)
    reference.load_state_dict(state, strict=True)  # the layout is OpenCLIP's, name for name
    model = clip_from_open_clip({f"module.{k}": v for k, v in state.items()})  # a DDP-saved checkpoint loads too
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(0, 500, (2, 16))
    ids[0, 5:], ids[1, 9:] = 0, 0  # OpenCLIP pads with 0 after the end-of-text token (the largest id)
    ids[0, 4], ids[1, 8] = 513, 513
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixel_values=pixels).pooler_output,
                                   reference.encode_image(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.get_text_features(input_ids=ids).pooler_output, reference.encode_text(ids),
                                   atol=1e-5, rtol=1e-5)
    assert model.logit_scale.item() == pytest.approx(state["logit_scale"].item())


def test_open_clip_conversion_refuses_unknown_weights():
    state = _random_state(open_clip_state_shapes(), seed=0)
    state["visual.head.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="does not know.*visual.head.weight"):
        clip_from_open_clip(state)


def test_vit_h_14_architecture_is_read_from_the_checkpoint_shapes():
    """HPSv2's backbone, OpenCLIP ViT-H/14, from its shapes alone (meta tensors, nothing allocated): the published
    architecture (32 vision layers of 1280, 16 heads, 14 px patches at 224 px; 24 text layers of 1024, 16 heads;
    1024-d embeddings) and its published size, 986.1 M parameters (OpenCLIP's model profile)."""
    from transformers import CLIPModel

    shapes = open_clip_state_shapes(vision_width=1280, vision_layers=32, patch=14, image_size=224, text_width=1024,
                                    text_layers=24, context=77, vocab=49408, embed=1024)
    config = open_clip_config({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    v, t = config.vision_config, config.text_config
    assert (v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.patch_size, v.image_size) == (32, 1280, 16, 14, 224)
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.max_position_embeddings) == (24, 1024, 16, 77)
    assert (config.projection_dim, t.eos_token_id, v.intermediate_size) == (1024, 49407, 5120)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in CLIPModel(config).parameters())
    assert parameters == pytest.approx(986.11e6, rel=2e-3)
    assert parameters == sum(int(np.prod(s)) for s in shapes.values())  # every checkpoint tensor has a place


def test_imagereward_conversion_matches_blip_and_the_release_formula():
    shapes = imagereward_state_shapes(vocab=82)
    state = _random_state(shapes, seed=5)
    model = imagereward_from_checkpoint(state)
    vit = BlipVitReference(128, 16, shapes["blip.visual_encoder.pos_embed"][1])
    vit.load_state_dict({k[len("blip.visual_encoder."):]: v for k, v in state.items() if k.startswith("blip.visual_encoder.")},
                        strict=True)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 13, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        tokens = vit(pixels)
        torch.testing.assert_close(model.vision_model(pixel_values=pixels).last_hidden_state, tokens, atol=1e-5, rtol=1e-5)
        text = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=tokens,
                                  encoder_attention_mask=torch.ones(tokens.shape[:2], dtype=torch.long), is_decoder=False)
        features = text.last_hidden_state[:, 0]
        w = [state[f"mlp.layers.{i}.weight"] for i in (0, 2, 4, 6, 7)]
        b = [state[f"mlp.layers.{i}.bias"] for i in (0, 2, 4, 6, 7)]
        raw = features
        for weight, bias in zip(w, b):  # five linear layers, no activation (dropout is off in evaluation)
            raw = raw @ weight.T + bias
        expected = (raw.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
        torch.testing.assert_close(model(pixels, ids, mask), expected, atol=1e-5, rtol=1e-5)
        # The prompt matters through cross-attention: another prompt, another reward.
        assert not torch.allclose(model(pixels, ids.flip(0), mask.flip(0)), expected)


# ---- preprocessing -----------------------------------------------------------------------------------------------


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def test_imagereward_transform_is_torchvision_resize_and_centre_crop():
    """Resize(32): shorter side 37 -> 32, longer 50 -> int(32 * 50 / 37) = 43; CenterCrop(32): left offset
    round(5.5) = 6 (torchvision rounds; a floor would give 5), top 0."""
    image = _image(50, 37)
    resized = image.resize((43, 32), Image.BICUBIC)
    expected = np.asarray(resized)[:, 6:38]
    ours = resize_and_center_crop(image, 32)
    np.testing.assert_array_equal(np.asarray(ours), expected)
    pixels = normalized_pixels([ours])[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(pixels, (expected / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), atol=1e-5)
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073) and CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_hpsv2_transform_resizes_the_longer_side_and_pads_black():
    """ResizeMaxSize(32): 50 x 37 -> 32 x round(37 * 32 / 50) = 32 x 24 (bicubic), padded with 0 to 32 x 32: 4 rows
    above, 4 below; a 50 x 35 image -> 32 x 22, 5 rows above and 5 below; pads are black before normalisation."""
    for height, new_height, top in ((37, 24, 4), (35, 22, 5), (31, 20, 6)):
        image = _image(50, height, seed=height)
        ours = np.asarray(resize_longer_side_and_pad(image, 32))
        resized = np.asarray(image.resize((32, new_height), Image.BICUBIC))
        np.testing.assert_array_equal(ours[top : top + new_height], resized)
        assert ours[:top].max() == 0 and ours[top + new_height :].max() == 0
        assert 32 - new_height - top == (32 - new_height) - (32 - new_height) // 2  # the odd row goes below
    pixels = normalized_pixels([resize_longer_side_and_pad(_image(50, 37), 32)])[0]
    torch.testing.assert_close(pixels[:, 0, 0], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))


# ---- the scorers, loaded from the release layouts in folders ------------------------------------------------------


@pytest.fixture(scope="module")
def release_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    return {"hpsv2": tiny_hpsv2_checkpoint(str(root / "hps")),
            "hpsv2.1": tiny_hpsv2_checkpoint(str(root / "hps"), seed=1, filename="HPS_v2.1_compressed.pt"),
            "imagereward": tiny_imagereward_checkpoint(str(root / "imagereward"))}


def test_scorers_load_the_releases_and_score_by_their_formulas(release_folders, tmp_path):
    images = [_image(50, 37, seed=s) for s in range(3)]
    prompts = ["a red cat", "two dogs", "3 cars"]
    hps, hps21 = load_scorer("hpsv2", release_folders["hpsv2"]), load_scorer("hpsv2.1", release_folders["hpsv2.1"])
    scores = hps.score(images, prompts)
    assert scores.shape == (3,) and scores.abs().max() <= 1.0  # a cosine, not logit-scaled
    torch.testing.assert_close(scores, hps.cosines(images, prompts))
    assert not torch.allclose(scores, hps21.score(images, prompts))  # v2.1 reads its own file
    pixels = hps.pixel_values(images[:1])[0]
    torch.testing.assert_close(pixels, normalized_pixels([resize_longer_side_and_pad(images[0], 32)])[0])
    # Saved converted (save_pretrained + tokenizer), the folder loads as it is and scores the same.
    hps.model.save_pretrained(tmp_path / "converted")
    hps.processor.save_pretrained(tmp_path / "converted")
    torch.testing.assert_close(load_scorer("hpsv2", str(tmp_path / "converted")).score(images, prompts), scores)

    reward = load_scorer("imagereward", release_folders["imagereward"])
    tokens = reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (3, 35)  # ImageReward pads every prompt to 35 BERT tokens
    expected = reward.model(normalized_pixels([resize_and_center_crop(im, 32) for im in images]), tokens["input_ids"],
                            tokens["attention_mask"])
    torch.testing.assert_close(reward.score(images, prompts), expected)
    alone = torch.cat([reward.score([im], [p]) for im, p in zip(images, prompts)])
    torch.testing.assert_close(reward.score(images, prompts), alone, atol=1e-5, rtol=1e-5)


def test_missing_or_wrong_checkpoints_are_named(release_folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no ImageReward.pt"):
        load_scorer("imagereward", str(tmp_path))
    torch.save({"state_dict": {"something.else": torch.zeros(1)}}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(ValueError, match="not an OpenCLIP ViT checkpoint"):
        load_scorer("hpsv2", str(tmp_path), processor_path=release_folders["hpsv2"])


def test_offline_mode_never_downloads(monkeypatch):
    """With HF_HUB_OFFLINE=1 and nothing cached, the default Hub checkpoint is looked up in the cache only and fails
    with the Hub library's offline error instead of downloading."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Exception, match="(?i)offline|cache|local"):
        load_scorer("imagereward")
