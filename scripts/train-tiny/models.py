"""Model configurations for tiny-shapes: Stable Diffusion's three networks at toy widths.

Every config uses the stock diffusers / transformers classes with Stable Diffusion 1.x's structure, so
the exported folder loads with StableDiffusionPipeline and any SD 1.x implementation that reads the
configs (our Rust pipeline) runs it unchanged.
"""

from __future__ import annotations

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 64],  # 3 levels -> 2 downsamplings -> factor 4: 64x64 -> 16x16
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=1.0,  # replaced by 1/std of the latents after training
)

TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=64,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=[32, 64, 128],
    layers_per_block=1,
    attention_head_dim=4,  # diffusers' legacy meaning, as in SD 1.x's config: number of heads
    cross_attention_dim=64,
    norm_num_groups=16,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    timestep_spacing="trailing",
)


def make_vae(**over):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**VAE_CONFIG, **over})


def make_text_encoder(**over):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**{**TEXT_CONFIG, **over}))


def make_unet(**over):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**UNET_CONFIG, **over})


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())
