#!/usr/bin/env bash
# What an offline GPU machine needs beside the repository to run bench/cuda_checks.sh, made on a machine with a
# package index and this project's .venv (`make setup`):
#   .whl/          wheels (CPython 3.12, manylinux x86-64) of the packages a CUDA image with torch, triton and
#                  transformers lacks or holds in other versions, at the versions this .venv runs, and py-spy;
#   .gpu/smollm2/  the default base's config.json and tokenizer (`hub base prepare`), for a base of its shapes;
#   .gpu/llama1b/  a 1B-class Llama config.json (Llama 3.2 1B's shapes), for the larger model's figures.
# Both folders are ignored by git (.git/info/exclude); carry them to the GPU machine with the working tree, then
#   bash bench/cuda_checks.sh .gpu/smollm2 .gpu/llama1b
set -eu
cd "$(dirname "$0")/.."
for ignored in /.whl/ /.gpu/; do grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude; done
PACKAGES="transformers huggingface_hub kernels tomlkit httpx2 httpcore2 truststore hf-xet regex grpcio
grpcio-health-checking grpcio-reflection protobuf peft gguf jsonschema referencing jsonschema-specifications rpds-py
starlette uvicorn click typer pydantic pydantic_core annotated-types typing-inspection typing_extensions"
pins=$(.venv/bin/pip list --format=freeze 2>/dev/null | awk -F== -v want="$(echo $PACKAGES | tr ' ' '\n')" '
  BEGIN { n = split(want, w, "\n"); for (i = 1; i <= n; i++) { k = tolower(w[i]); gsub(/[-_]/, "-", k); keep[k] = 1 } }
  { k = tolower($1); gsub(/[-_]/, "-", k); if (k in keep) print $1 "==" $2 }')
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl $pins py-spy
mkdir -p .gpu/smollm2 .gpu/llama1b
base=$(.venv/bin/hub base prepare | tail -1)
cp "$base"/config.json "$base"/generation_config.json "$base"/tokenizer*.json .gpu/smollm2/
cat > .gpu/llama1b/config.json <<'EOF'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
 "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
 "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "tie_word_embeddings": true,
 "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}
EOF
echo "cuda_bundle: $(ls .whl | wc -l) wheels ($(du -sh .whl | cut -f1)) in .whl/, configs in .gpu/"
