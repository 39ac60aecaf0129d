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


def tiny_flux_text_pipeline(transformer):
    """A FluxPipeline with a tiny CLIP encoder and a tiny T5 encoder (d_model 32) whose character-level tokenizer is
    built in memory (no download): enough for the real ``encode_prompt``."""
    import diffusers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    t5_tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t5_tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    clip_tokenizer, config = tiny_clip()
    torch.manual_seed(0)
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=CLIPTextModel(config).eval(),
        tokenizer=clip_tokenizer, transformer=transformer,
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).eval(),
        tokenizer_2=PreTrainedTokenizerFast(tokenizer_object=t5_tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"))


def add_lora(model, name="default", rank=4, seed=100, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A random (non-zero) PEFT LoRA adapter on the attention projections, via diffusers' ``add_adapter``."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(targets)),
                      adapter_name=name)
    return model


def tiny_flux(seed=0):
    """diffusers' FluxTransformer2DModel test configuration."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                            pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
