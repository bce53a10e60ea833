"""Writes a GGUF model as a Hugging Face folder (config, safetensors in
float32, tokenizer and chat template) for vLLM, which no longer reads GGUF
files itself. Offline: transformers dequantizes the file's weights.

    python convert.py MODEL.gguf OUT_DIR
"""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main() -> None:
    path, out = sys.argv[1], sys.argv[2]
    folder, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are plain float32 now: drop the GGUF quantizer, or
    # transformers refuses to save a "quantized" model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print("converted", path, "->", out)


if __name__ == "__main__":
    main()
