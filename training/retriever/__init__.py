"""``mmedrag train retriever``: contrastive fine-tuning of a domain's CLIP-style retriever (open_clip)."""
