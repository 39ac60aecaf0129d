"""Tiny diffusers models from diffusers' own test configurations (random weights, no download), shared by tests."""
import torch

BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def tiny_unet(seed=0, in_channels=4, time_cond_proj_dim=None):
    """diffusers' SDXL UNet test configuration (cross-attention 64, pooled 32, time_ids 6 x 8)."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32, time_cond_proj_dim=time_cond_proj_dim).eval()


def tiny_clip():
    """diffusers' test-config CLIP text config and a byte-level CLIP tokenizer built in memory (no download)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(ByteLevel.alphabet()):
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                            layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5, vocab_size=1000,
                            hidden_act="gelu", projection_dim=32)
    return tokenizer, config


def tiny_sdxl_text_pipeline():
    """A StableDiffusionXLPipeline with diffusers' test-config CLIP encoders (random weights) and a byte-level
    CLIP tokenizer built in memory (no download): enough for the real ``encode_prompt``."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, config = tiny_clip()
    torch.manual_seed(0)
    return diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=CLIPTextModel(config).eval(), text_encoder_2=CLIPTextModelWithProjection(config).eval(),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=None, scheduler=diffusers.EulerDiscreteScheduler(**BETAS))


def tiny_sd3_text_pipeline(transformer):
    """A StableDiffusion3Pipeline with tiny CLIP encoders and no T5 (the pipeline then uses zero T5 embeddings of
    ``transformer.config.joint_attention_dim``): enough for the real ``encode_prompt``."""
    import diffusers
    from transformers import CLIPTextModelWithProjection

    tokenizer, config = tiny_clip()
    torch.manual_seed(0)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=CLIPTextModelWithProjection(config).eval(), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(config).eval(), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)


def char_tokenizer(pad="<pad>", eos="</s>", unk="<unk>"):
    """A character-level T5-style fast tokenizer built in memory (no download): pad 0, eos 1, unk 2, then a-z and space."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {pad: 0, eos: 1, unk: 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, eos_token=eos, unk_token=unk)


def tiny_flux_text_pipeline(transformer):
    """A FluxPipeline with a tiny CLIP encoder and a tiny T5 encoder (d_model 32) whose character-level tokenizer is
    built in memory (no download): enough for the real ``encode_prompt``."""
    import diffusers
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer, config = tiny_clip()
    torch.manual_seed(0)
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=CLIPTextModel(config).eval(),
        tokenizer=clip_tokenizer, transformer=transformer,
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).eval(),
        tokenizer_2=char_tokenizer())


def tiny_wan_text_pipeline(transformer, scheduler=None, vae=None):
    """A WanPipeline around ``transformer`` with a UMT5 encoder of transformers' UMT5 test configuration (d_model 32,
    random weights) and a character-level tokenizer built in memory (no download): the real ``encode_prompt``."""
    import diffusers
    from transformers import T5Config, UMT5EncoderModel

    config = T5Config(vocab_size=99, d_model=32, d_ff=37, d_kv=8, num_layers=5, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    return diffusers.WanPipeline(tokenizer=char_tokenizer(), text_encoder=UMT5EncoderModel(config).eval(),
                                 transformer=transformer, vae=vae,
                                 scheduler=scheduler or diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0))


def add_lora(model, name="default", rank=4, seed=100, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A random (non-zero) PEFT LoRA adapter on the attention projections, via diffusers' ``add_adapter``."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(targets)),
                      adapter_name=name)
    return model


def tiny_flux(seed=0, guidance_embeds=False, in_channels=16):
    """diffusers' FluxTransformer2DModel test configuration (16 packed channels: 4 latent channels)."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds).eval()


def tiny_sd3(seed=0):
    """diffusers' SD3.5 transformer test configuration (dual attention, RMS qk-norm)."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm").eval()


def tiny_wan(seed=0):
    """diffusers' WanPipeline test transformer configuration (16 latent channels, text_dim 32, patch (1, 2, 2))."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32).eval()


def tiny_wan_vae():
    """diffusers' WanPipeline test VAE configuration (z_dim 16, 4x temporal and 8x spatial compression)."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[False, True, True]).eval()


def recipe_scheduler(**config):
    """diffusers' FlowMatchEulerDiscreteScheduler set to a step-distillation recipe's sigmas, linspace(1, 1/N, N) before
    its shift (lightx2v's Wan 2.1 LoRA: shift 5, stochastic steps); WanPipeline calls set_timesteps(N) and takes no
    sigmas, so a diffusers user of the recipe swaps in a scheduler like this one."""
    import diffusers
    import numpy as np

    class RecipeScheduler(diffusers.FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), device=device)

    return RecipeScheduler(**config)
