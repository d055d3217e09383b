"""RAG-based preference tuning (MMed-RAG §3.3): two DPO stages with LoRA on TRL's ``DPOTrainer``.

``config.MMedRAGDPOConfig`` (settings; the paper's values documented next to the small-model defaults),
``defaults`` (folder names, ``PAPER_SETTINGS``, help texts; no TRL import), ``data`` (the pair files of
``mmedrag pairs`` → a TRL vision preference dataset), ``trainer`` (``MMedRAGDPOTrainer``: the rejected side's
own image, reference = adapters disabled; ``run_dpo``: one stage), ``cli.dpo_cli`` (``mmedrag dpo``).
Import the module you need: this package imports nothing heavy itself.
"""
