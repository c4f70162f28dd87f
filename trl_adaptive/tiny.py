"""Offline building blocks: a byte-level CLIP tokenizer, tiny SD/SDXL pipelines, a toy preference set, and
random-weight pipelines of a real architecture read from a folder of configs (`random_pipeline`).

Used by the tests, the built-in example, the benchmarks and the GPU check: nothing here downloads anything. The tokenizer has the
real CLIP byte-level alphabet and special tokens but no merges (one token per character), which is enough to
condition a tiny text encoder; real-sized pipelines should use the real tokenizer files
(`CLIPTokenizer.from_pretrained(folder)`).
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile

import numpy as np
import torch


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (printable bytes map to themselves)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    alphabet, shift = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shift))
            shift += 1
    return alphabet


def tiny_clip_tokenizer(folder: str | None = None, model_max_length: int = 16):
    """A character-level CLIP tokenizer written to `folder` (a temporary one by default) and loaded from it."""
    from transformers import CLIPTokenizer

    folder = folder or tempfile.mkdtemp(prefix="tiny-clip-tokenizer-")
    os.makedirs(folder, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    # transformers 5 ignores vocab_file= arguments: from_pretrained(folder) is the loading path that works.
    return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def tiny_unet_config(cross_attention_dim: int = 32, sample_size: int = 8, in_channels: int = 4, **overrides) -> dict:
    config = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        attention_head_dim=4,
    )
    config.update(overrides)
    return config


def tiny_text_encoder(
    hidden_size: int = 32, vocab_size: int = 514, max_positions: int = 16, seed: int = 0, projection_dim: int | None = None
):
    """A 2-layer CLIP text encoder; with `projection_dim`, a `CLIPTextModelWithProjection` (SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=projection_dim or hidden_size,
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon", resolution: int = 32):
    """A randomly initialised StableDiffusionPipeline small enough to train on a CPU in seconds.

    The VAE downsamples by 4 (two blocks), so `resolution` 32 gives 8x8x4 latents.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(sample_size=resolution // 4))
    vae = tiny_vae(resolution)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type=prediction_type, clip_sample=False, steps_offset=1,  # what StableDiffusionPipeline enforces
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=tiny_text_encoder(seed=seed),
        tokenizer=tiny_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_vae(resolution: int = 32, scaling_factor: float = 0.18215, force_upcast: bool = True,
             shift_factor: float | None = None):
    """A randomly initialised AutoencoderKL that downsamples by 4 (`resolution` 32 gives 8x8x4 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        shift_factor=shift_factor,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def tiny_sdxl_pipeline(seed: int = 0, resolution: int = 32, prediction_type: str = "epsilon"):
    """A randomly initialised StableDiffusionXLPipeline with SDXL's structure at toy size.

    Two CLIP text encoders (hidden sizes 32 and 32, the second a `CLIPTextModelWithProjection` with a 32-d
    projection), so the UNet cross-attends to their concatenated 64-d penultimate states and its added embedding
    takes the 6 size/crop time ids (8-d Fourier features each) plus the 32-d pooled text embedding: 6 * 8 + 32 = 80.
    The VAE downsamples by 4 and, like SDXL's, has `force_upcast=True` (kept in float32).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    time_embed_dim, pooled_dim = 8, 32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        norm_num_groups=8,
    )
    vae = tiny_vae(resolution, scaling_factor=0.13025, force_upcast=True)
    # SDXL ships an Euler sampler; training uses the DDPM forward process of the same schedule.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=tiny_text_encoder(seed=seed),
        text_encoder_2=tiny_text_encoder(seed=seed + 1, projection_dim=pooled_dim),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def tiny_t5_tokenizer(model_max_length: int = 512):
    """An offline T5 tokenizer: a unigram vocabulary of single characters (plus T5's special tokens)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [(c, -3.0) for c in "0123456789.,!?'-"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(d_model: int = 32, vocab_size: int = 64, seed: int = 0):
    """A one-layer T5 encoder (the T5-XXL of SD3 and Flux at toy size)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model, num_layers=1,
                      num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    return T5EncoderModel(config).eval()  # as from_pretrained returns it


def tiny_sd3_pipeline(seed: int = 0, resolution: int = 32):
    """A randomly initialised StableDiffusion3Pipeline with SD3's structure at toy size.

    Two projected CLIP encoders (32-d hidden states, 32-d projections: 64-d pooled), a 64-d T5 (the CLIP states,
    64-d side by side, are padded to T5's width as in SD3), a one-block MMDiT on 8x8x4 latents, SD3's VAE shift
    and scale, and SD3's flow-matching scheduler (shift 3).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 4, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=2 * resolution // 4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_vae(resolution, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=tiny_text_encoder(seed=seed, projection_dim=32),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_text_encoder(seed=seed + 1, projection_dim=32),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(d_model=64, seed=seed + 2),
        tokenizer_3=tiny_t5_tokenizer(),
    )


def tiny_flux_pipeline(seed: int = 0, resolution: int = 32, guidance_embeds: bool = True):
    """A randomly initialised FluxPipeline with Flux.1's structure at toy size: CLIP (32-d pooled) and a 32-d T5,
    a transformer with one double- and one single-stream block on 2x2-packed 8x8x4 latents (16 tokens of 16
    channels), 3-axis rotary ids, the guidance embedding of Flux.1-dev (`guidance_embeds`), Flux's VAE shift and
    scale, and its scheduler (dynamic shifting at inference)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(resolution, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=tiny_text_encoder(seed=seed),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(d_model=32, seed=seed + 1),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer,
    )


def toy_preference_dataset(num_pairs: int = 32, size: int = 32, seed: int = 0, schema: str = "pickapic"):
    """Synthetic preference pairs: the preferred image is brighter in the colour the prompt names.

    `schema` is `pickapic` (encoded PNG bytes and label_0, half the pairs with the winner second) or `trl`
    (PIL images in chosen/rejected).
    """
    import io

    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = {"red": 0, "green": 1, "blue": 2}
    rows = []
    for i in range(num_pairs):
        name, channel = list(colours.items())[i % 3]
        base = rng.uniform(0, 120, size=(2, size, size, 3))
        base[0, ..., channel] += 120  # the winner
        images = [Image.fromarray(b.clip(0, 255).astype(np.uint8)) for b in base]
        prompt = f"a {name} square"
        if schema == "trl":
            rows.append({"prompt": prompt, "chosen": images[0], "rejected": images[1]})
            continue
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        swap = i % 2 == 1
        rows.append(
            {
                "caption": prompt,
                "jpg_0": encoded[1] if swap else encoded[0],
                "jpg_1": encoded[0] if swap else encoded[1],
                "label_0": 0.0 if swap else 1.0,
                "label_1": 1.0 if swap else 0.0,
            }
        )
    return Dataset.from_list(rows)


def _stand_in_tokenizer(class_name: str):
    """An offline tokenizer for a folder that ships none: CLIP's character-level one at 77 tokens, or the T5 one."""
    return tiny_t5_tokenizer() if class_name.startswith("T5") else tiny_clip_tokenizer(model_max_length=77)


def random_pipeline(folder: str, device="cpu", seed: int | None = None):
    """A pipeline with the architecture of `folder` (a diffusers model folder holding configs and tokenizer files but
    no weights, such as `../shared/model-configs/sd15`) and random weights, built directly on `device` (`"meta"`
    builds shapes only, for counting parameters and FLOPs). Tokenizers and schedulers are read from their files; a
    tokenizer whose folder is missing (the SD3.5 / Flux configs in benchmarks/model-configs) is replaced by the
    offline stand-in: other token ids, the same sequence lengths, which is all that timing and memory depend on."""
    import diffusers

    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    if seed is not None:
        torch.manual_seed(seed)
    components, init_kwargs = {}, {}
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(spec, list):  # pipeline options such as requires_safety_checker
            init_kwargs[name] = spec
            continue
        library, class_name = spec
        if library is None or class_name is None:
            components[name] = None
            continue
        cls = getattr(importlib.import_module(library), class_name)
        path = os.path.join(folder, name)
        if "Tokenizer" in class_name and not os.path.isdir(path):
            components[name] = _stand_in_tokenizer(class_name)
        elif "Tokenizer" in class_name or "Scheduler" in class_name:
            components[name] = cls.from_pretrained(path)
        else:
            with torch.device(device):
                if library == "transformers":
                    components[name] = cls._from_config(cls.config_class.from_pretrained(path))
                else:
                    components[name] = cls.from_config(cls.load_config(path))
    return getattr(diffusers, index["_class_name"])(**components, **init_kwargs)


def tiny_clip_scorer(folder: str, seed: int = 0, projection_dim: int = 16) -> str:
    """A random-weight CLIP model with its processor (32 px images, the character-level tokenizer) saved to `folder`,
    loadable as any CLIP-based scorer of `trl_adaptive.evaluation` (PickScore, CLIP score, the aesthetic backbone)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    model.save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _random_state(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of the given shapes; LayerNorm-like vectors (names ending in weight, 1-D) around 1."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        tensor = 0.1 * torch.randn(shape, generator=generator)
        state[name] = tensor + 1.0 if len(shape) == 1 and name.endswith("weight") and "norm" in name.lower() else tensor
    return state


def open_clip_state_shapes(vision_width=160, vision_layers=1, patch=8, image_size=32, text_width=64, text_layers=1,
                           context=16, vocab=514, embed=16) -> dict[str, tuple]:
    """Parameter names and shapes of an OpenCLIP ViT CLIP model (HPSv2's checkpoint layout); the defaults are tiny, with
    ViT-H/14's head widths (80 for vision: 2 heads here, 64 for text: 1 head)."""
    shapes = {"logit_scale": (), "token_embedding.weight": (vocab, text_width), "positional_embedding": (context, text_width),
              "ln_final.weight": (text_width,), "ln_final.bias": (text_width,), "text_projection": (text_width, embed),
              "visual.conv1.weight": (vision_width, 3, patch, patch), "visual.class_embedding": (vision_width,),
              "visual.positional_embedding": ((image_size // patch) ** 2 + 1, vision_width),
              "visual.ln_pre.weight": (vision_width,), "visual.ln_pre.bias": (vision_width,),
              "visual.ln_post.weight": (vision_width,), "visual.ln_post.bias": (vision_width,),
              "visual.proj": (vision_width, embed)}  # fmt: skip
    for prefix, width, layers in (("transformer", text_width, text_layers), ("visual.transformer", vision_width, vision_layers)):
        for i in range(layers):
            block = f"{prefix}.resblocks.{i}"
            shapes.update({f"{block}.ln_1.weight": (width,), f"{block}.ln_1.bias": (width,),
                           f"{block}.attn.in_proj_weight": (3 * width, width), f"{block}.attn.in_proj_bias": (3 * width,),
                           f"{block}.attn.out_proj.weight": (width, width), f"{block}.attn.out_proj.bias": (width,),
                           f"{block}.ln_2.weight": (width,), f"{block}.ln_2.bias": (width,),
                           f"{block}.mlp.c_fc.weight": (4 * width, width), f"{block}.mlp.c_fc.bias": (4 * width,),
                           f"{block}.mlp.c_proj.weight": (width, 4 * width), f"{block}.mlp.c_proj.bias": (width,)})  # fmt: skip
    return shapes


def tiny_hpsv2_checkpoint(folder: str, seed: int = 0, filename: str = "HPS_v2_compressed.pt") -> str:
    """A random-weight HPSv2 release in its own layout (``{"state_dict": OpenCLIP weights}`` in `filename`) and the
    character-level CLIP tokenizer, in `folder`: what `hpsv2=<folder>` loads, converted on the way."""
    os.makedirs(folder, exist_ok=True)
    state = _random_state(open_clip_state_shapes(), seed)
    state["logit_scale"] = torch.tensor(np.log(100.0), dtype=torch.float32)
    torch.save({"epoch": 1, "state_dict": state}, os.path.join(folder, filename))
    tiny_clip_tokenizer(folder).save_pretrained(folder)
    return folder


def tiny_bert_tokenizer(folder: str):
    """An uncased WordPiece tokenizer of letters and digits (BERT's special tokens), saved to and loaded from `folder`."""
    from transformers import BertTokenizer

    os.makedirs(folder, exist_ok=True)
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *("##" + p for p in pieces), ".", ","]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)  # with its tokenizer.json and config, so AutoTokenizer loads the folder
    return tokenizer


def imagereward_state_shapes(vision_width=128, vision_layers=1, patch=16, image_size=32, text_width=64, text_layers=1,
                             vocab=82, max_positions=40) -> dict[str, tuple]:
    """Names and shapes of ImageReward's release (BLIP's timm-style ViT, BLIP's cross-attention BERT, the MLP head);
    the defaults are tiny, with BLIP's 64-wide heads."""
    v, t = "blip.visual_encoder", "blip.text_encoder"
    shapes = {f"{v}.cls_token": (1, 1, vision_width), f"{v}.pos_embed": (1, (image_size // patch) ** 2 + 1, vision_width),
              f"{v}.patch_embed.proj.weight": (vision_width, 3, patch, patch), f"{v}.patch_embed.proj.bias": (vision_width,),
              f"{v}.norm.weight": (vision_width,), f"{v}.norm.bias": (vision_width,),
              f"{t}.embeddings.word_embeddings.weight": (vocab, text_width),
              f"{t}.embeddings.position_embeddings.weight": (max_positions, text_width),
              f"{t}.embeddings.LayerNorm.weight": (text_width,), f"{t}.embeddings.LayerNorm.bias": (text_width,),
              # BLIP's contrastive projections: in the release, unused by the reward
              "blip.vision_proj.weight": (256, vision_width), "blip.vision_proj.bias": (256,)}  # fmt: skip
    for i in range(vision_layers):
        b = f"{v}.blocks.{i}"
        for name, shape in (("norm1", (vision_width,)), ("norm2", (vision_width,))):
            shapes.update({f"{b}.{name}.weight": shape, f"{b}.{name}.bias": shape})
        for name, (out_dim, in_dim) in (("attn.qkv", (3 * vision_width, vision_width)), ("attn.proj", (vision_width, vision_width)),
                                        ("mlp.fc1", (4 * vision_width, vision_width)), ("mlp.fc2", (vision_width, 4 * vision_width))):
            shapes.update({f"{b}.{name}.weight": (out_dim, in_dim), f"{b}.{name}.bias": (out_dim,)})
    for i in range(text_layers):
        b = f"{t}.encoder.layer.{i}"
        for attention, kv_width in (("attention", text_width), ("crossattention", vision_width)):
            for name, in_dim in (("query", text_width), ("key", kv_width), ("value", kv_width)):
                shapes.update({f"{b}.{attention}.self.{name}.weight": (text_width, in_dim), f"{b}.{attention}.self.{name}.bias": (text_width,)})
            shapes.update({f"{b}.{attention}.output.dense.weight": (text_width, text_width),
                           f"{b}.{attention}.output.dense.bias": (text_width,),
                           f"{b}.{attention}.output.LayerNorm.weight": (text_width,),
                           f"{b}.{attention}.output.LayerNorm.bias": (text_width,)})
        shapes.update({f"{b}.intermediate.dense.weight": (4 * text_width, text_width), f"{b}.intermediate.dense.bias": (4 * text_width,),
                       f"{b}.output.dense.weight": (text_width, 4 * text_width), f"{b}.output.dense.bias": (text_width,),
                       f"{b}.output.LayerNorm.weight": (text_width,), f"{b}.output.LayerNorm.bias": (text_width,)})
    for index, (out_dim, in_dim) in zip((0, 2, 4, 6, 7), ((1024, text_width), (128, 1024), (64, 128), (16, 64), (1, 16))):
        shapes.update({f"mlp.layers.{index}.weight": (out_dim, in_dim), f"mlp.layers.{index}.bias": (out_dim,)})
    return shapes


def tiny_imagereward_checkpoint(folder: str, seed: int = 0) -> str:
    """A random-weight ImageReward release in its own layout (``ImageReward.pt``) and a tiny BERT tokenizer, in
    `folder`: what `imagereward=<folder>` loads, converted on the way."""
    os.makedirs(folder, exist_ok=True)
    tokenizer = tiny_bert_tokenizer(folder)
    state = _random_state(imagereward_state_shapes(vocab=len(tokenizer)), seed)
    torch.save(state, os.path.join(folder, "ImageReward.pt"))
    return folder


def write_pickapic_parquet(folder: str, num_rows: int = 200, num_files: int = 2, size: int = 40, seed: int = 0,
                           tie_every: int = 8, num_prompts: int = 24) -> list[str]:
    """Pick-a-Pic v2-format parquet files (its columns: caption, jpg_0/jpg_1 as JPEG bytes, label_0/label_1 with a
    tie every `tie_every` rows, are_different, has_label, user and image ids, ...), `num_rows` rows split over
    `num_files` files named like the real ones. Prompts repeat (`num_prompts` distinct), as Pick-a-Pic's do.
    Returns the file paths, in order."""
    import io
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(num_rows):
        encoded = []
        for _ in range(2):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, size=(size, size + 8 * (i % 3), 3), dtype=np.uint8)).save(
                buffer, format="JPEG", quality=90)
            encoded.append(buffer.getvalue())
        label_0 = 0.5 if tie_every and i % tie_every == tie_every - 1 else float(rng.integers(0, 2))
        rows.append({
            "are_different": True, "best_image_uid": f"img-{i}-{0 if label_0 == 1.0 else 1}",
            "caption": f"prompt number {int(rng.integers(0, num_prompts))}", "created_at": "2023-04-01 12:00:00",
            "has_label": True, "image_0_uid": f"img-{i}-0", "image_0_url": "", "image_1_uid": f"img-{i}-1",
            "image_1_url": "", "jpg_0": encoded[0], "jpg_1": encoded[1], "label_0": label_0, "label_1": 1.0 - label_0,
            "model_0": "tiny", "model_1": "tiny", "ranking_id": i, "user_id": int(rng.integers(0, 50)),
            "num_example_per_prompt": 1,
        })
    paths = []
    per_file = -(-num_rows // num_files)
    for k in range(num_files):
        path = os.path.join(folder, f"train-{k:05d}-of-{num_files:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows[k * per_file : (k + 1) * per_file]), path)
        paths.append(path)
    return paths
