"""What the planner knows without a download: real models' config facts, devices' datasheets (cited), edgellm's
measured quality cost per format, and published speeds from other hardware to check predictions against.

Config facts are copied from each model's config.json on the Hugging Face Hub (the fields ModelSpec reads).
"""

from __future__ import annotations

from edgellm.perf.profile import DeviceProfile, datasheet_device

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "gpt_oss": "GptOssForCausalLM"}


def _llama(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int, tied: bool, **extra) -> dict:
    arch = ARCHITECTURES[extra.get("model_type", "llama")]
    return {"architectures": [arch], "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab,
            "tie_word_embeddings": tied, **extra}


MODELS: dict[str, dict] = {
    "llama-2-7b": _llama(4096, 32, 32, 32, 11008, 32000, False),
    "llama-3.2-1b": _llama(2048, 16, 32, 8, 8192, 128256, True, head_dim=64),
    "llama-3.2-3b": _llama(3072, 28, 24, 8, 8192, 128256, True, head_dim=128),
    "llama-3.1-8b": _llama(4096, 32, 32, 8, 14336, 128256, False),
    "smollm2-135m": _llama(576, 30, 9, 3, 1536, 49152, True),
    "smollm2-360m": _llama(960, 32, 15, 5, 2560, 49152, True),
    "smollm2-1.7b": _llama(2048, 24, 32, 32, 8192, 49152, True),
    "qwen2.5-0.5b": _llama(896, 24, 14, 2, 4864, 151936, True, model_type="qwen2"),
    "qwen2.5-1.5b": _llama(1536, 28, 12, 2, 8960, 151936, True, model_type="qwen2"),
    "qwen2.5-3b": _llama(2048, 36, 16, 2, 11008, 151936, True, model_type="qwen2"),
    "qwen2.5-7b": _llama(3584, 28, 28, 4, 18944, 152064, False, model_type="qwen2"),
    "qwen2.5-14b": _llama(5120, 48, 40, 8, 13824, 152064, False, model_type="qwen2"),
    "qwen2.5-32b": _llama(5120, 64, 40, 8, 27648, 152064, False, model_type="qwen2"),
    "qwen3-0.6b": _llama(1024, 28, 16, 8, 3072, 151936, True, head_dim=128, model_type="qwen3"),
    "qwen3-1.7b": _llama(2048, 28, 16, 8, 6144, 151936, True, head_dim=128, model_type="qwen3"),
    "qwen3-4b": _llama(2560, 36, 32, 8, 9728, 151936, True, head_dim=128, model_type="qwen3"),
    "qwen3-8b": _llama(4096, 36, 32, 8, 12288, 151936, False, head_dim=128, model_type="qwen3"),
    "qwen3-14b": _llama(5120, 40, 40, 8, 17408, 151936, False, head_dim=128, model_type="qwen3"),
    "qwen3-32b": _llama(5120, 64, 64, 8, 25600, 151936, False, head_dim=128, model_type="qwen3"),
    "mixtral-8x7b": _llama(4096, 32, 32, 8, 14336, 32000, False, model_type="mixtral", num_local_experts=8,
                           num_experts_per_tok=2, sliding_window=None),
    "qwen3-30b-a3b": _llama(2048, 48, 32, 4, 6144, 151936, False, head_dim=128, model_type="qwen3_moe",
                            num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
    "olmoe-1b-7b": _llama(2048, 16, 16, 16, 1024, 50304, False, model_type="olmoe", num_experts=64,
                          num_experts_per_tok=8),
    "gpt-oss-20b": _llama(2880, 24, 64, 8, 2880, 201088, False, head_dim=64, model_type="gpt_oss",
                          num_local_experts=32, num_experts_per_tok=4, sliding_window=128),
}
NATIVE_FORMAT = {"gpt-oss-20b": "mxfp4"}  # released quantized; every other catalog model ships in bf16

# Δ perplexity (%) against bf16 weights / an fp16 cache, measured by edgellm on its built-in model
# (README: "Quality, built-in model" and the agent-memory table). A format not listed has no measurement.
WEIGHT_QUALITY_COST = {"fp32": 0.0, "bf16": 0.0, "fp16": 0.0, "q8_0": -0.02, "q4_0": -0.04, "int4-g64": 0.07,
                       "mxfp4": 0.14, "int3-g128": 0.37, "int2-g64": 1.02, "ternary": 36.8}
KV_QUALITY_COST = {"fp32": 0.0, "bf16": 0.0, "fp16": 0.0, "q8": 0.006, "q4": -0.078, "q4-kivi-h": -0.074,
                   "q2-kivi-h": 1.307, "q2": 3.501}

APPLE = "https://www.apple.com/newsroom/"
DEVICES: dict[str, DeviceProfile] = {
    "m2-max": datasheet_device("Apple M2 Max (38-core GPU)", APPLE + "2023/01/apple-unveils-m2-pro-and-m2-max", 96,
                               400, 13.6, launch_us=5, power_w=60),
    "m2-ultra": datasheet_device("Apple M2 Ultra (76-core GPU)", APPLE + "2023/06/apple-introduces-m2-ultra", 192,
                                 800, 27.2, launch_us=5, power_w=100),
    "m4-pro": datasheet_device("Apple M4 Pro (20-core GPU)", APPLE + "2024/10/new-macbook-pro-features-m4-family-"
                               "of-chips-and-apple-intelligence", 64, 273, 9.2, launch_us=5, power_w=40,
                               note="TFLOPS not published by Apple: 20 cores x 128 ALUs x 2 x 1.8 GHz"),
    "m4-max": datasheet_device("Apple M4 Max (40-core GPU)", APPLE + "2024/10/new-macbook-pro-features-m4-family-"
                               "of-chips-and-apple-intelligence", 128, 546, 18.4, launch_us=5, power_w=70,
                               note="TFLOPS not published by Apple: 40 cores x 128 ALUs x 2 x 1.8 GHz"),
    "h100": datasheet_device("NVIDIA H100 SXM 80GB", "https://www.nvidia.com/en-us/data-center/h100/", 80, 3350, 989,
                             launch_us=4, power_w=700, host_memory_gb=512, host_link_gbs=55),
    "h200": datasheet_device("NVIDIA H200 SXM 141GB", "https://www.nvidia.com/en-us/data-center/h200/", 141, 4800,
                             989, launch_us=4, power_w=700, host_memory_gb=512, host_link_gbs=55),
    "mi300x": datasheet_device("AMD Instinct MI300X", "https://www.amd.com/en/products/accelerators/instinct/mi300/"
                               "mi300x.html", 192, 5300, 1307, launch_us=6, power_w=750, host_memory_gb=512,
                               host_link_gbs=55),
    "mi325x": datasheet_device("AMD Instinct MI325X", "https://www.amd.com/en/products/accelerators/instinct/mi300/"
                               "mi325x.html", 256, 6000, 1307, launch_us=6, power_w=1000, host_memory_gb=512,
                               host_link_gbs=55),
    # WaferLLM (OSDI 2025) on a Cerebras WSE-2: 850K cores, 48 KB SRAM each (40 GB), 20 PB/s aggregate; a layer's
    # reductions cross the 2-D mesh (~1 ns per hop, ~2·sqrt(cores) hops), modelled as the per-layer cost.
    "wafer": datasheet_device("Cerebras-style wafer (WSE-2 class)", "https://arxiv.org/abs/2502.04563; "
                              "https://www.cerebras.ai/product-chip/", 40, 20e6, 7500, launch_us=1.8, ops_per_layer=4,
                              power_w=15000, mem_efficiency=0.3, sram_per_core_kb=48, mesh_hop_ns=1.0),
    "phone-npu": datasheet_device("Snapdragon 8 Gen 3 (Hexagon NPU, LPDDR5X)", "https://www.qualcomm.com/products/"
                                  "mobile/snapdragon/smartphones/snapdragon-8-series-mobile-platforms/snapdragon-8-"
                                  "gen-3-mobile-platform", 12, 77, 34, launch_us=20, power_w=8, mem_efficiency=0.6),
    "raspberry-pi-5": datasheet_device("Raspberry Pi 5 (4x Cortex-A76, LPDDR4X)", "https://www.raspberrypi.com/"
                                       "products/raspberry-pi-5/", 8, 17, 0.15, launch_us=2, power_w=10,
                                       mem_efficiency=0.5),
}

# Decode tok/s of Llama-2-7B Q4_0 (llama-bench tg128, batch 1, all layers on the GPU), llama.cpp's own scoreboards.
PUBLISHED = [
    {"device": "m2-ultra", "model": "llama-2-7b", "format": "q4_0", "metric": "decode_tok_s", "value": 94.3,
     "source": "https://github.com/ggml-org/llama.cpp/discussions/4167"},
    {"device": "m4-pro", "model": "llama-2-7b", "format": "q4_0", "metric": "decode_tok_s", "value": 50.7,
     "source": "https://github.com/ggml-org/llama.cpp/discussions/4167"},
    {"device": "m4-max", "model": "llama-2-7b", "format": "q4_0", "metric": "decode_tok_s", "value": 83.1,
     "source": "https://github.com/ggml-org/llama.cpp/discussions/4167"},
    {"device": "h100", "model": "llama-2-7b", "format": "q4_0", "metric": "decode_tok_s", "value": 280.7,
     "source": "https://github.com/ggml-org/llama.cpp/discussions/15013"},
]
