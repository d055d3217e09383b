"""OpenAI-compatible chat-completions server on transformers: the stand-in for vLLM off-GPU."""
