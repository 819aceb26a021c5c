"""The quality report: what fine-tuning and quantizing did to the model, measured the same way for every variant.

Modules, each small and named for what it does:

- `tokens`: the one tokenizer (the base model's HF tokenizer) and the chat format's BOS/stop rules;
  every text is tokenized once here and the same ids go to every backend.
- `backends`: one interface over transformers (a folder, optionally + a LoRA adapter, or a GPTQ
  checkpoint) and llama.cpp (a GGUF with an F32 KV cache): full-vocabulary log-probabilities per
  position for given token ids, and greedy continuation.
- `corpora`: the perplexity texts (`heldout`, `hsk`, `peoples-daily`, text files).
- `perplexity`: sliding windows (context length, stride, BOS rule) and perplexity.
- `kld`: KL divergence and top-1 agreement of quantized variants against the reference, over the
  full vocabulary on the same windows (as llama.cpp's `perplexity --kl-divergence`).
- `categories`: subject → category tables of C-Eval and CMMLU.
- `multiple_choice`: C-Eval/CMMLU folders, the built-in `hsk-translate` set, prompts, scoring.
- `chinese_reply`: the share of greedy replies to Chinese prompts that are mostly Chinese.
- `speed`: prompt and generation tokens/s of a GGUF on this machine.
- `variants`: which models the build made (base, after SFT/DPO, GGUFs, GPTQ) and how to open each.
- `gates`: the recipe's limits checked against the figures.
- `plots`, `report`: PNG figures and `report.md`.
- `stage`: the `eval` stage that runs all of the above.
"""
