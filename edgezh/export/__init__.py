"""Export: streaming LoRA merge, HF→GGUF, llama.cpp quantize, GPTQ, Ollama Modelfiles."""
