"""The families autolm ships, by model_type: each family's file, classes and llama.cpp architecture."""

from __future__ import annotations

# The families autolm ships, imported on first use (a load imports its own family's file alone, not every one's):
# model_type -> (module, config class, model class, llama.cpp's architecture name for the family's GGUF files,
# None where llama.cpp has none, or a tuple of several: the model class's `gguf` layout's, then its `gguf_more`).
# tests/test_loading.py checks each entry against its module.
_LLAMA = ("llama", "exaone", "internlm2")  # Llama's architectures: its own and remote-code models' files
_QWEN2 = ("qwen2", "qwen2vl")
FAMILIES: dict[str, tuple[str, str, str, str | tuple[str, ...] | None]] = {
    "llama": ("llama", "LlamaConfig", "LlamaForCausalLM", _LLAMA),
    "llava": ("llama", "LlavaConfig", "LlamaForCausalLM", _LLAMA),  # image-text: its language model
    "perception_lm": ("llama", "PerceptionLMConfig", "LlamaForCausalLM", _LLAMA),  # image-text: its LM
    "llava_next": ("llama", "LlavaNextConfig", "LlamaForCausalLM", _LLAMA),  # image-text: its language model
    "idefics3": ("llama", "Idefics3Config", "LlamaForCausalLM", _LLAMA),  # image-text: its language model
    "smolvlm": ("llama", "SmolVLMConfig", "LlamaForCausalLM", _LLAMA),  # image-text: its language model
    "vipllava": ("llama", "VipLlavaConfig", "LlamaForCausalLM", _LLAMA),  # image-text: its language model
    "video_llava": ("llama", "VideoLlavaConfig", "LlamaForCausalLM", _LLAMA),  # image-text: its LM
    "llava_next_video": ("llama", "LlavaNextVideoConfig", "LlamaForCausalLM", _LLAMA),  # image-text: its LM
    "deepseek_vl": ("llama", "DeepseekVLConfig", "LlamaForCausalLM", _LLAMA),  # image-text: its LM
    "deepseek_vl_hybrid": ("llama", "DeepseekVLHybridConfig", "LlamaForCausalLM", _LLAMA),  # image-text
    "janus": ("llama", "JanusConfig", "LlamaForCausalLM", _LLAMA),  # image-text: its language model
    "voxtral": ("llama", "VoxtralConfig", "LlamaForCausalLM", _LLAMA),  # audio-text: its language model
    "glmasr": ("llama", "GlmAsrConfig", "LlamaForCausalLM", _LLAMA),  # audio-text: its language model
    "mistral": ("mistral", "MistralConfig", "MistralForCausalLM", "llama"),
    "idefics2": ("mistral", "Idefics2Config", "MistralForCausalLM", "llama"),  # image-text: its LM
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", _QWEN2),
    "qwen2_vl": ("qwen2", "Qwen2VLConfig", "Qwen2ForCausalLM", _QWEN2),  # image-text: its LM
    "fast_vlm": ("qwen2", "FastVlmConfig", "Qwen2ForCausalLM", _QWEN2),  # image-text: its LM
    "qwen2_5_vl": ("qwen2", "Qwen2_5_VLConfig", "Qwen2ForCausalLM", _QWEN2),  # image-text
    "qwen2_5_omni_thinker": ("qwen2", "Qwen2_5OmniThinkerConfig", "Qwen2ForCausalLM", _QWEN2),  # omni: its LM
    "qwen2_5_omni": ("qwen2", "Qwen2_5OmniConfig", "Qwen2ForCausalLM", _QWEN2),  # omni: its thinker's LM
    "llava_onevision": ("qwen2", "LlavaOnevisionConfig", "Qwen2ForCausalLM", _QWEN2),  # image-text
    "internvl": ("qwen2", "InternVLConfig", "Qwen2ForCausalLM", _QWEN2),  # image-text: its language model
    "got_ocr2": ("qwen2", "GotOcr2Config", "Qwen2ForCausalLM", _QWEN2),  # image-text: its language model
    "ovis2": ("qwen2", "Ovis2Config", "Qwen2ForCausalLM", _QWEN2),  # image-text: its language model
    "qwen2_audio": ("qwen2", "Qwen2AudioConfig", "Qwen2ForCausalLM", _QWEN2),  # audio-text: its LM
    "audioflamingo3": ("qwen2", "AudioFlamingo3Config", "Qwen2ForCausalLM", _QWEN2),  # audio-text: its LM
    "musicflamingo": ("qwen2", "MusicFlamingoConfig", "Qwen2ForCausalLM", _QWEN2),  # audio-text: its LM
    "vibevoice_asr": ("qwen2", "VibeVoiceAsrConfig", "Qwen2ForCausalLM", _QWEN2),  # audio-text: its LM
    "video_llama_3": ("qwen2", "VideoLlama3Config", "Qwen2ForCausalLM", _QWEN2),  # image-text: its LM
    "pp_chart2table": ("qwen2", "PPChart2TableConfig", "Qwen2ForCausalLM", _QWEN2),  # image-text: its LM
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", ("qwen3", "qwen3vl")),
    "qwen3_vl": ("qwen3", "Qwen3VLConfig", "Qwen3ForCausalLM", ("qwen3", "qwen3vl")),  # image-text: its LM
    "cosmos3_omni": ("qwen3", "Cosmos3OmniConfig", "Qwen3ForCausalLM", ("qwen3", "qwen3vl")),  # image-text
    "lighton_ocr": ("qwen3", "LightOnOcrConfig", "Qwen3ForCausalLM", ("qwen3", "qwen3vl")),  # image-text
    "qianfan_ocr": ("qwen3", "QianfanOCRConfig", "Qwen3ForCausalLM", ("qwen3", "qwen3vl")),  # image-text
    "qwen3_asr": ("qwen3", "Qwen3ASRConfig", "Qwen3ForCausalLM", ("qwen3", "qwen3vl")),  # audio-text
    "fun_asr_nano": ("qwen3", "FunAsrNanoConfig", "Qwen3ForCausalLM", ("qwen3", "qwen3vl")),  # audio-text
    "moss_transcribe_diarize": (
        "qwen3",
        "MossTranscribeDiarizeConfig",
        "Qwen3ForCausalLM",
        ("qwen3", "qwen3vl"),
    ),  # audio-text: its language model
    "gemma2": ("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "gemma2"),
    "gemma3_text": ("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3"),
    "gemma3": ("gemma3", "Gemma3Config", "Gemma3ForCausalLM", "gemma3"),  # image-text: its language model
    "shieldgemma2": ("gemma3", "ShieldGemma2Config", "Gemma3ForCausalLM", "gemma3"),  # image-text: its LM
    "phi3": ("phi3", "Phi3Config", "Phi3ForCausalLM", "phi3"),
    # image/audio-text: its LM
    "phi4_multimodal": ("phi3", "Phi4MultimodalConfig", "Phi3ForCausalLM", "phi3"),
    "olmo2": ("olmo2", "Olmo2Config", "Olmo2ForCausalLM", "olmo2"),
    "granite": ("granite", "GraniteConfig", "GraniteForCausalLM", ("granite", "minicpm")),  # + MiniCPM 1/2
    "granite_speech": ("granite", "GraniteSpeechConfig", "GraniteForCausalLM", ("granite", "minicpm")),
    "granite_docling": ("granite", "GraniteDoclingConfig", "GraniteForCausalLM", ("granite", "minicpm")),
    "granite4_vision": ("granite", "Granite4VisionConfig", "GraniteForCausalLM", ("granite", "minicpm")),
    "smollm3": ("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", "smollm3"),
    "mixtral": ("mixtral", "MixtralConfig", "MixtralForCausalLM", "llama"),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "qwen2moe"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", ("qwen3moe", "qwen3vlmoe")),
    "qwen3_vl_moe": ("qwen3_moe", "Qwen3VLMoeConfig", "Qwen3MoeForCausalLM", ("qwen3moe", "qwen3vlmoe")),
    "qwen3_omni_moe_thinker": (
        "qwen3_moe",
        "Qwen3OmniMoeThinkerConfig",
        "Qwen3MoeForCausalLM",
        ("qwen3moe", "qwen3vlmoe"),
    ),  # omni: its language model
    # omni: its thinker's language model
    "qwen3_omni_moe": ("qwen3_moe", "Qwen3OmniMoeConfig", "Qwen3MoeForCausalLM", ("qwen3moe", "qwen3vlmoe")),
    "gpt_oss": ("gpt_oss", "GptOssConfig", "GptOssForCausalLM", "gpt-oss"),
    "gpt2": ("gpt2", "GPT2Config", "GPT2LMHeadModel", "gpt2"),
    "gpt-sw3": ("gpt2", "GPTSw3Config", "GPT2LMHeadModel", "gpt2"),  # GPT-2 (transformers' GPT2Config)
    "gemma": ("gemma", "GemmaConfig", "GemmaForCausalLM", "gemma"),
    "paligemma": ("gemma", "PaliGemmaConfig", "GemmaForCausalLM", "gemma"),  # image-text: its language model
    "starcoder2": ("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", "starcoder2"),
    "phi": ("phi", "PhiConfig", "PhiForCausalLM", "phi2"),
    "gpt_neox": ("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", "gptneox"),
    "olmo": ("olmo", "OlmoConfig", "OlmoForCausalLM", "olmo"),
    "stablelm": ("stablelm", "StableLmConfig", "StableLmForCausalLM", "stablelm"),
    "cohere": ("cohere", "CohereConfig", "CohereForCausalLM", "command-r"),
    "granitemoe": ("granitemoe", "GraniteMoeConfig", "GraniteMoeForCausalLM", "granitemoe"),
    "olmoe": ("olmoe", "OlmoeConfig", "OlmoeForCausalLM", "olmoe"),
    "glm4": ("glm4", "Glm4Config", "Glm4ForCausalLM", "glm4"),
    "glm4v": ("glm4", "Glm4vConfig", "Glm4ForCausalLM", "glm4"),  # image-text: its language model
    "glm46v": ("glm4", "Glm46VConfig", "Glm4ForCausalLM", "glm4"),  # image-text: its language model
    "glmga": ("glm4", "GlmgaConfig", "Glm4ForCausalLM", "glm4"),  # image-text: its language model
    "glm_ocr": ("glm4", "GlmOcrConfig", "Glm4ForCausalLM", "glm4"),  # image-text: its language model
    "olmo3": ("olmo3", "Olmo3Config", "Olmo3ForCausalLM", "olmo2"),  # llama.cpp writes OLMo 3 as olmo2
    "exaone4": ("exaone4", "Exaone4Config", "Exaone4ForCausalLM", "exaone4"),
    "exaone4_5": ("exaone4", "Exaone4_5_Config", "Exaone4ForCausalLM", "exaone4"),  # image-text: its LM
    "ernie4_5": ("ernie4_5", "Ernie4_5Config", "Ernie4_5ForCausalLM", "ernie4_5"),
    "paddleocr_vl_text": ("paddleocr_vl", "PaddleOCRTextConfig", "PaddleOCRVLForCausalLM", "paddleocr"),
    # image-text
    "paddleocr_vl": ("paddleocr_vl", "PaddleOCRVLConfig", "PaddleOCRVLForCausalLM", "paddleocr"),
    # no llama.cpp
    "cosmos3_edge_text": ("cosmos3_edge", "Cosmos3EdgeTextConfig", "Cosmos3EdgeForCausalLM", None),
    # image-text: its LM
    "cosmos3_edge": ("cosmos3_edge", "Cosmos3EdgeConfig", "Cosmos3EdgeForCausalLM", None),
    "nemotron": ("nemotron", "NemotronConfig", "NemotronForCausalLM", "nemotron"),
    "arcee": ("arcee", "ArceeConfig", "ArceeForCausalLM", "arcee"),
    "glm4_moe": ("glm4_moe", "Glm4MoeConfig", "Glm4MoeForCausalLM", "glm4moe"),
    "glm4v_moe": ("glm4_moe", "Glm4vMoeConfig", "Glm4MoeForCausalLM", "glm4moe"),  # image-text: its LM
    "dots1": ("dots1", "Dots1Config", "Dots1ForCausalLM", "dots1"),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", "deepseek2"),
    "kimi_k25": ("deepseek_v3", "Kimi_K25Config", "DeepseekV3ForCausalLM", "deepseek2"),  # image-text: its LM
    "ernie4_5_moe": ("ernie4_5_moe", "Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", "ernie4_5-moe"),
    "ernie4_5_vl_moe_text": (
        "ernie4_5_vl_moe",
        "Ernie4_5_VLMoeTextConfig",
        "Ernie4_5_VLMoeForCausalLM",
        None,
    ),  # llama.cpp has none
    # image-text: its language model
    "ernie4_5_vl_moe": ("ernie4_5_vl_moe", "Ernie4_5_VLMoeConfig", "Ernie4_5_VLMoeForCausalLM", None),
    "seed_oss": ("seed_oss", "SeedOssConfig", "SeedOssForCausalLM", "seed_oss"),
    "hunyuan_v1_dense": (
        "hunyuan_v1_dense",
        "HunYuanDenseV1Config",
        "HunYuanDenseV1ForCausalLM",
        "hunyuan-dense",
    ),
    "hunyuan_vl_text": ("hunyuan_vl", "HunYuanVLTextConfig", "HunYuanVLForCausalLM", "hunyuan_vl"),
    "hunyuan_vl": ("hunyuan_vl", "HunYuanVLConfig", "HunYuanVLForCausalLM", "hunyuan_vl"),  # image-text
    "gpt_bigcode": ("gpt_bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", "starcoder"),
    "falcon": ("falcon", "FalconConfig", "FalconForCausalLM", "falcon"),
    "deepseek_v2": ("deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM", "deepseek2"),
    "deepseek_ocr2_text": (
        "deepseek_ocr2",
        "DeepseekOcr2TextConfig",
        "DeepseekOcr2TextForCausalLM",
        "deepseek2-ocr",
    ),
    # image-text
    "deepseek_ocr2": ("deepseek_ocr2", "DeepseekOcr2Config", "DeepseekOcr2TextForCausalLM", "deepseek2-ocr"),
    "unlimited_ocr_text": ("deepseek_ocr2", "UnlimitedOcrTextConfig", "UnlimitedOcrTextForCausalLM", None),
    # image-text
    "unlimited_ocr": ("deepseek_ocr2", "UnlimitedOcrConfig", "UnlimitedOcrTextForCausalLM", None),
    "molmo2_text": ("molmo2", "Molmo2TextConfig", "Molmo2TextForCausalLM", None),  # llama.cpp has none
    "molmo2": ("molmo2", "Molmo2Config", "Molmo2TextForCausalLM", None),  # image-text: its language model
    "glm4_moe_lite": ("glm4_moe_lite", "Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", "deepseek2"),
    "solar_open": ("solar_open", "SolarOpenConfig", "SolarOpenForCausalLM", "glm4moe"),
    "youtu": ("youtu", "YoutuConfig", "YoutuForCausalLM", "deepseek2"),
    "ministral": ("ministral", "MinistralConfig", "MinistralForCausalLM", None),
    "ministral3": ("ministral3", "Ministral3Config", "Ministral3ForCausalLM", "mistral3"),
    "mistral3": ("ministral3", "Mistral3Config", "Ministral3ForCausalLM", "mistral3"),  # image-text: its LM
    "mistral4": ("mistral4", "Mistral4Config", "Mistral4ForCausalLM", "mistral4"),
    "mistral_large4_text": ("mistral_large4", "MistralLarge4TextConfig", "MistralLarge4ForCausalLM", None),
    # image-text
    "mistral_large4": ("mistral_large4", "MistralLarge4Config", "MistralLarge4ForCausalLM", None),
    "opt": ("opt", "OPTConfig", "OPTForCausalLM", None),
    "blip-2": ("opt", "Blip2Config", "OPTForCausalLM", None),  # image-text: its language model
    "instructblip": ("opt", "InstructBlipConfig", "OPTForCausalLM", None),  # image-text: its language model
    "instructblipvideo": ("opt", "InstructBlipVideoConfig", "OPTForCausalLM", None),  # image-text: its LM
    "persimmon": ("persimmon", "PersimmonConfig", "PersimmonForCausalLM", None),  # llama.cpp dropped it
    "fuyu": ("persimmon", "FuyuConfig", "PersimmonForCausalLM", None),  # image-text: its language model
    "xglm": ("xglm", "XGLMConfig", "XGLMForCausalLM", None),
    # BART-style encoder-decoders' decoders (transformers' *ForCausalLM); llama.cpp has none (T5's only)
    "bart": ("bart", "BartConfig", "BartForCausalLM", None),
    "mbart": ("bart", "MBartConfig", "MBartForCausalLM", None),
    "marian": ("bart", "MarianConfig", "MarianForCausalLM", None),
    "pegasus": ("bart", "PegasusConfig", "PegasusForCausalLM", None),
    "blenderbot": ("bart", "BlenderbotConfig", "BlenderbotForCausalLM", None),
    "blenderbot-small": ("bart", "BlenderbotSmallConfig", "BlenderbotSmallForCausalLM", None),
    "plbart": ("bart", "PLBartConfig", "PLBartForCausalLM", None),
    "mvp": ("bart", "MvpConfig", "MvpForCausalLM", None),
    "trocr": ("bart", "TrOCRConfig", "TrOCRForCausalLM", None),
    "whisper": ("bart", "WhisperConfig", "WhisperForCausalLM", None),  # its decoder; llama.cpp has no Whisper
    "bigbird_pegasus": ("bart", "BigBirdPegasusConfig", "BigBirdPegasusForCausalLM", None),  # its decoder
    # llama.cpp has none
    "kosmos_2_text_model": ("kosmos2", "Kosmos2TextConfig", "Kosmos2TextForCausalLM", None),
    "kosmos-2": ("kosmos2", "Kosmos2Config", "Kosmos2TextForCausalLM", None),  # image-text: its LM
    # llama.cpp has none
    "kosmos_2_5_text_model": ("kosmos2_5", "Kosmos2_5TextConfig", "Kosmos2_5TextForCausalLM", None),
    "kosmos-2.5": ("kosmos2_5", "Kosmos2_5Config", "Kosmos2_5TextForCausalLM", None),  # image-text: its LM
    "biogpt": ("biogpt", "BioGptConfig", "BioGptForCausalLM", None),
    # BERT-style encoders run as decoders (is_decoder); llama.cpp's BERT is an encoder embedding model: no GGUF
    "bert": ("bert", "BertConfig", "BertLMHeadModel", None),
    "roberta": ("bert", "RobertaConfig", "RobertaForCausalLM", None),
    "xlm-roberta": ("bert", "XLMRobertaConfig", "XLMRobertaForCausalLM", None),
    "camembert": ("bert", "CamembertConfig", "CamembertForCausalLM", None),
    "data2vec-text": ("bert", "Data2VecTextConfig", "Data2VecTextForCausalLM", None),
    "electra": ("bert", "ElectraConfig", "ElectraForCausalLM", None),
    "ernie": ("bert", "ErnieConfig", "ErnieForCausalLM", None),
    "xlm": ("xlm", "XLMConfig", "XLMWithLMHeadModel", None),  # llama.cpp has none
    "xlnet": ("xlnet", "XLNetConfig", "XLNetLMHeadModel", None),  # llama.cpp has none
    "roberta-prelayernorm": (
        "bert_prenorm",
        "RobertaPreLayerNormConfig",
        "RobertaPreLayerNormForCausalLM",
        None,
    ),
    "xlm-roberta-xl": ("bert_prenorm", "XLMRobertaXLConfig", "XLMRobertaXLForCausalLM", None),
    "megatron-bert": ("bert_prenorm", "MegatronBertConfig", "MegatronBertForCausalLM", None),
    "bert-generation": ("bert_prenorm", "BertGenerationConfig", "BertGenerationDecoder", None),
    "git": ("git", "GitConfig", "GitForCausalLM", None),  # image-text: its text decoder; llama.cpp: none
    "roformer": ("roformer", "RoFormerConfig", "RoFormerForCausalLM", None),  # llama.cpp has none
    "rembert": ("rembert", "RemBertConfig", "RemBertForCausalLM", None),  # llama.cpp has none
    "xmod": ("xmod", "XmodConfig", "XmodForCausalLM", None),  # llama.cpp has none
    "big_bird": ("big_bird", "BigBirdConfig", "BigBirdForCausalLM", None),  # llama.cpp has none
    "roc_bert": ("roc_bert", "RoCBertConfig", "RoCBertForCausalLM", None),  # llama.cpp has none
    "openai-gpt": ("openai_gpt", "OpenAIGPTConfig", "OpenAIGPTLMHeadModel", None),  # llama.cpp has none
    "ctrl": ("ctrl", "CTRLConfig", "CTRLLMHeadModel", None),  # llama.cpp has none
    "cpmant": ("cpmant", "CpmAntConfig", "CpmAntForCausalLM", None),  # llama.cpp has none
    "prophetnet": ("prophetnet", "ProphetNetConfig", "ProphetNetForCausalLM", None),  # llama.cpp has none
    "reformer": ("reformer", "ReformerConfig", "ReformerModelWithLMHead", None),  # llama.cpp has none
    "apertus": ("apertus", "ApertusConfig", "ApertusForCausalLM", "apertus"),
    "helium": ("helium", "HeliumConfig", "HeliumForCausalLM", None),
    "moshi": ("moshi", "MoshiConfig", "MoshiForCausalLM", None),  # its text decoder; no llama.cpp
    # MusicGen's audio-token decoder (the file MusicgenForCausalLM writes); no llama.cpp
    "musicgen_decoder": ("musicgen", "MusicgenDecoderConfig", "MusicgenForCausalLM", None),
    "musicgen_melody_decoder": (
        "musicgen",
        "MusicgenMelodyDecoderConfig",
        "MusicgenMelodyForCausalLM",
        None,
    ),  # MusicGen Melody's decoder (the file MusicgenMelodyForCausalLM writes); no llama.cpp
    "musicgen": ("musicgen", "MusicgenConfig", "MusicgenForCausalLM", None),  # composite: its decoder
    "musicgen_melody": ("musicgen", "MusicgenMelodyConfig", "MusicgenMelodyForCausalLM", None),  # its decoder
    "doge": ("doge", "DogeConfig", "DogeForCausalLM", None),  # llama.cpp has none
    "nanochat": ("nanochat", "NanoChatConfig", "NanoChatForCausalLM", None),
    "gemma4_text": ("gemma4", "Gemma4TextConfig", "Gemma4ForCausalLM", "gemma4"),
    "gemma4": ("gemma4", "Gemma4Config", "Gemma4ForCausalLM", "gemma4"),  # image-text: its language model
    "gemma4_unified_text": (
        "gemma4_unified",
        "Gemma4UnifiedTextConfig",
        "Gemma4UnifiedForCausalLM",
        "gemma4",
    ),
    # image-text: its language model
    "gemma4_unified": ("gemma4_unified", "Gemma4UnifiedConfig", "Gemma4UnifiedForCausalLM", "gemma4"),
    # Gemma 4's drafter for speculative decoding (reads the target's state); llama.cpp has none
    "gemma4_assistant": ("gemma4_assistant", "Gemma4AssistantConfig", "Gemma4AssistantForCausalLM", None),
    "gemma4_unified_assistant": (
        "gemma4_unified_assistant",
        "Gemma4UnifiedAssistantConfig",
        "Gemma4UnifiedAssistantForCausalLM",
        None,
    ),
    "minimax_m2": ("minimax_m2", "MiniMaxM2Config", "MiniMaxM2ForCausalLM", "minimax-m2"),
    "minimax_m3_vl_text": ("minimax_m3", "MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM", "minimax-m3"),
    "minimax_m3_vl": ("minimax_m3", "MiniMaxM3VLConfig", "MiniMaxM3VLForCausalLM", "minimax-m3"),
    "minimax": ("minimax", "MiniMaxConfig", "MiniMaxForCausalLM", "minimax-01"),
    "hy_v3": ("hy_v3", "HYV3Config", "HYV3ForCausalLM", "hy_v3"),
    "hy_v4": ("hy_v4", "HYV4Config", "HYV4ForCausalLM", "hy_v4"),
    "deepseek_v4": ("deepseek_v4", "DeepseekV4Config", "DeepseekV4ForCausalLM", "deepseek4"),
    "mimo_v2_flash": ("mimo_v2_flash", "MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", "mimo2"),
    "llama4_text": ("llama4", "Llama4TextConfig", "Llama4ForCausalLM", "llama4"),
    "llama4": ("llama4", "Llama4Config", "Llama4ForCausalLM", "llama4"),  # image-text: its language model
    "mllama_text_model": ("mllama", "MllamaTextConfig", "MllamaForCausalLM", None),  # llama.cpp has none
    "mllama": ("mllama", "MllamaConfig", "MllamaForCausalLM", None),  # image-text: its language model
    "idefics": ("idefics", "IdeficsConfig", "IdeficsForCausalLM", None),  # image-text: its LM; no llama.cpp
    "emu3_text_model": ("emu3", "Emu3TextConfig", "Emu3ForCausalLM", None),  # llama.cpp has none
    "emu3": ("emu3", "Emu3Config", "Emu3ForCausalLM", None),  # image-text: its language model
    "chameleon": ("chameleon", "ChameleonConfig", "ChameleonForConditionalGeneration", "chameleon"),  # its LM
    "hunyuan_v1_moe": ("hunyuan_v1_moe", "HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", "hunyuan-moe"),
    "exaone_moe": ("exaone_moe", "ExaoneMoeConfig", "ExaoneMoeForCausalLM", "exaone-moe"),
    "afmoe": ("afmoe", "AfmoeConfig", "AfmoeForCausalLM", "afmoe"),
    "laguna": ("laguna", "LagunaConfig", "LagunaForCausalLM", "laguna"),
    "step3p5": ("step3p5", "Step3p5Config", "Step3p5ForCausalLM", "step35"),
    "step3p7": ("step3p5", "Step3p7Config", "Step3p5ForCausalLM", "step35"),  # image-text: its LM
    "mellum": ("mellum", "MellumConfig", "MellumForCausalLM", "mellum"),
    "phimoe": ("phimoe", "PhimoeConfig", "PhimoeForCausalLM", "phimoe"),
    "dbrx": ("dbrx", "DbrxConfig", "DbrxForCausalLM", "dbrx"),
    "bloom": ("bloom", "BloomConfig", "BloomForCausalLM", "bloom"),
    "mpt": ("mpt", "MptConfig", "MptForCausalLM", "mpt"),
    "lfm2": ("lfm2", "Lfm2Config", "Lfm2ForCausalLM", "lfm2"),
    "lfm2_vl": ("lfm2", "Lfm2VlConfig", "Lfm2ForCausalLM", "lfm2"),  # image-text: its language model
    "lfm2_moe": ("lfm2_moe", "Lfm2MoeConfig", "Lfm2MoeForCausalLM", "lfm2moe"),
    "lfm3": ("lfm3", "Lfm3Config", "Lfm3ForCausalLM", None),
    "lfm3_vl": ("lfm3", "Lfm3VlConfig", "Lfm3ForCausalLM", None),  # image-text: its language model
    "olmo_hybrid": ("olmo_hybrid", "OlmoHybridConfig", "OlmoHybridForCausalLM", None),
    "qwen3_next": ("qwen3_next", "Qwen3NextConfig", "Qwen3NextForCausalLM", "qwen3next"),
    "qwen3_5_text": ("qwen3_5", "Qwen3_5TextConfig", "Qwen3_5ForCausalLM", "qwen35"),
    "qwen3_5": ("qwen3_5", "Qwen3_5Config", "Qwen3_5ForCausalLM", "qwen35"),  # image-text: its language model
    "minicpm_ocr": ("qwen3_5", "MiniCPMOcrConfig", "Qwen3_5ForCausalLM", "qwen35"),  # image-text: its LM
    "minicpmv4_6": ("qwen3_5", "MiniCPMV4_6Config", "Qwen3_5ForCausalLM", "qwen35"),  # image-text: its LM
    "minicpmv4_7": ("qwen3_5", "MiniCPMV4_7Config", "Qwen3_5ForCausalLM", "qwen35"),  # image-text: its LM
    "qwen3_5_moe_text": ("qwen3_5_moe", "Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", "qwen35moe"),
    "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeConfig", "Qwen3_5MoeForCausalLM", "qwen35moe"),  # image-text
    "qwen4_exp_text": ("qwen4_exp", "Qwen4ExpTextConfig", "Qwen4ExpForCausalLM", None),
    "qwen4_exp": ("qwen4_exp", "Qwen4ExpConfig", "Qwen4ExpForCausalLM", None),  # image-text: its LM
    "glm5_next_text": ("glm5_next", "Glm5NextTextConfig", "Glm5NextForCausalLM", "glm5-next"),
    "glm5_next": ("glm5_next", "Glm5NextConfig", "Glm5NextForCausalLM", "glm5-next"),  # image-text: its LM
    "granitemoehybrid": (
        "granitemoehybrid",
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        "granitehybrid",
    ),
    "nemotron_h": ("nemotron_h", "NemotronHConfig", "NemotronHForCausalLM", ("nemotron_h", "nemotron_h_moe")),
    "nemotron_h_omni": (
        "nemotron_h_omni",
        "NemotronH_Omni_Reasoning_V3_Config",
        "NemotronHForCausalLM",
        ("nemotron_h", "nemotron_h_moe"),
    ),  # image-audio-text: its language model
    "falcon_h1": ("falcon_h1", "FalconH1Config", "FalconH1ForCausalLM", "falcon-h1"),
    "mamba": ("mamba", "MambaConfig", "MambaForCausalLM", "mamba"),
    "falcon_mamba": ("falcon_mamba", "FalconMambaConfig", "FalconMambaForCausalLM", "mamba"),
    "rwkv": ("rwkv", "RwkvConfig", "RwkvForCausalLM", None),  # llama.cpp has RWKV-6/7, not RWKV-4
    "jamba": ("jamba", "JambaConfig", "JambaForCausalLM", "jamba"),
    "cohere2": ("cohere2", "Cohere2Config", "Cohere2ForCausalLM", "cohere2"),
    "aya_vision": ("cohere2", "AyaVisionConfig", "Cohere2ForCausalLM", "cohere2"),  # image-text: its LM
    "cohere2_vision": ("cohere2", "Cohere2VisionConfig", "Cohere2ForCausalLM", "cohere2"),  # image-text
    "cohere2_moe": ("cohere2_moe", "Cohere2MoeConfig", "Cohere2MoeForCausalLM", "cohere2moe"),
    "gemma3n_text": ("gemma3n", "Gemma3nTextConfig", "Gemma3nForCausalLM", "gemma3n"),
    "gemma3n": ("gemma3n", "Gemma3nConfig", "Gemma3nForCausalLM", "gemma3n"),  # image-audio-text: its LM
    "glm": ("glm", "GlmConfig", "GlmForCausalLM", "chatglm"),
    "mamba2": ("mamba2", "Mamba2Config", "Mamba2ForCausalLM", "mamba2"),
    "granite_swa": ("granite_swa", "GraniteSWAConfig", "GraniteSWAForCausalLM", "granite_swa"),
    "granitemoe_swa": ("granitemoe_swa", "GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", "granite_swa"),
    "granitemoeshared": (
        "granitemoeshared",
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        "granitemoe",
    ),
    "vaultgemma": ("vaultgemma", "VaultGemmaConfig", "VaultGemmaForCausalLM", None),  # llama.cpp has none
    "minicpm3": ("minicpm3", "MiniCPM3Config", "MiniCPM3ForCausalLM", "minicpm3"),
    "internlm3": ("internlm3", "InternLM3Config", "InternLM3ForCausalLM", "llama"),
    "gpt_neo": ("gpt_neo", "GPTNeoConfig", "GPTNeoForCausalLM", None),
    "bitnet": ("bitnet", "BitNetConfig", "BitNetForCausalLM", None),
    "gptj": ("gptj", "GPTJConfig", "GPTJForCausalLM", None),  # llama.cpp names "gptj" but runs none
    "codegen": ("codegen", "CodeGenConfig", "CodeGenForCausalLM", None),
    "bamba": ("bamba", "BambaConfig", "BambaForCausalLM", "granitehybrid"),  # as Granite 4.0's hybrid
    "flex_olmo": ("flex_olmo", "FlexOlmoConfig", "FlexOlmoForCausalLM", None),  # llama.cpp has none
    "jais2": ("jais2", "Jais2Config", "Jais2ForCausalLM", "jais2"),
    "cwm": ("cwm", "CwmConfig", "CwmForCausalLM", None),  # llama.cpp has none
    "hyperclovax": ("hyperclovax", "HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", None),  # llama.cpp has none
    "hyperclovax_vision_v2": ("hyperclovax", "HyperCLOVAXVisionV2Config", "HyperCLOVAXForCausalLM", None),
    "hrm_text": ("hrm_text", "HrmTextConfig", "HrmTextForCausalLM", "hrm_text"),
    "zaya": ("zaya", "ZayaConfig", "ZayaForCausalLM", None),  # llama.cpp has none
    "longcat_flash": ("longcat_flash", "LongcatFlashConfig", "LongcatFlashForCausalLM", None),  # no llama.cpp
    "diffllama": ("diffllama", "DiffLlamaConfig", "DiffLlamaForCausalLM", None),  # llama.cpp has none
    "jetmoe": ("jetmoe", "JetMoeConfig", "JetMoeForCausalLM", None),  # llama.cpp has none
    "aria_text": ("aria_text", "AriaTextConfig", "AriaTextForCausalLM", None),  # llama.cpp has none
    "aria": ("aria_text", "AriaConfig", "AriaTextForCausalLM", None),  # image-text: its language model
    # llama.cpp has none
    "gpt_neox_japanese": ("gpt_neox_japanese", "GPTNeoXJapaneseConfig", "GPTNeoXJapaneseForCausalLM", None),
    "flint": ("flint", "FlintConfig", "FlintForCausalLM", None),  # llama.cpp has none
    "axk1": ("axk1", "AXK1Config", "AXK1ForCausalLM", None),  # llama.cpp has none
    "beam": ("beam", "BeamConfig", "BeamForCausalLM", None),  # llama.cpp has none
    # llama.cpp has none
    "cohere_compass_text": ("cohere_compass", "CohereCompassTextConfig", "CohereCompassForCausalLM", None),
    # image-text: LM
    "cohere_compass": ("cohere_compass", "CohereCompassConfig", "CohereCompassForCausalLM", None),
    "axk2": ("axk2", "AXK2Config", "AXK2ForCausalLM", None),  # llama.cpp has none
    "deepseek_v32": ("deepseek_v32", "DeepseekV32Config", "DeepseekV32ForCausalLM", "deepseek32"),
    "glm_moe_dsa": ("glm_moe_dsa", "GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", "glm-dsa"),
    "dots3_note_text": ("dots3_note", "Dots3NoteTextConfig", "Dots3NoteForCausalLM", "dots3note"),
    # image-text-audio: its LM
    "dots3_note": ("dots3_note", "Dots3NoteConfig", "Dots3NoteForCausalLM", "dots3note"),
    "iquestcoder": ("iquestcoder", "IQuestCoderConfig", "IQuestCoderForCausalLM", "llama"),
    "kolibri1": ("kolibri1", "Kolibri1Config", "Kolibri1ForCausalLM", None),  # llama.cpp has none
    "zamba2": ("zamba2", "Zamba2Config", "Zamba2ForCausalLM", None),  # llama.cpp has none
    "zamba": ("zamba", "ZambaConfig", "ZambaForCausalLM", None),  # llama.cpp has none
    "kimi_linear": ("kimi_linear", "KimiLinearConfig", "KimiLinearForCausalLM", "kimi-linear"),
    "modernbert-decoder": (
        "modernbert_decoder",
        "ModernBertDecoderConfig",
        "ModernBertDecoderForCausalLM",
        None,
    ),  # llama.cpp has none (its modern-bert is the encoder)
    "inkling_text": ("inkling", "InklingTextConfig", "InklingForCausalLM", None),  # llama.cpp has none
    "inkling_mm_model": ("inkling", "InklingConfig", "InklingForCausalLM", None),  # image-text: its LM
    "inkling2_text": ("inkling2", "Inkling2TextConfig", "Inkling2ForCausalLM", None),  # llama.cpp has none
    "inkling2": ("inkling2", "Inkling2Config", "Inkling2ForCausalLM", None),  # image-text: its LM
    "bailing_hybrid": ("bailing_hybrid", "BailingHybridConfig", "BailingHybridForCausalLM", "bailingmoe3"),
    # llama.cpp has none
    "recurrent_gemma": ("recurrent_gemma", "RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", None),
    "xlstm": ("xlstm", "xLSTMConfig", "xLSTMForCausalLM", None),  # llama.cpp has none
    "blt": ("blt", "BltConfig", "BltForCausalLM", None),  # llama.cpp has none
    "muse_glimmer_text": ("muse_glimmer", "MuseGlimmerTextConfig", "MuseGlimmerForCausalLM", "muse-glimmer"),
    # image-text: its LM
    "muse_glimmer": ("muse_glimmer", "MuseGlimmerConfig", "MuseGlimmerForCausalLM", "muse-glimmer"),
    # llama.cpp has none
    "muse_spark_text": ("muse_spark", "MuseSparkTextConfig", "MuseSparkForCausalLM", None),
    "muse_spark": ("muse_spark", "MuseSparkConfig", "MuseSparkForCausalLM", None),  # image-audio-text: its LM
}
