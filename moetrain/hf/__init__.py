"""Hugging Face round trip: export a checkpoint as a folder transformers loads, import one for
continued pretraining (`model.init.from_hf`) or upcycling (`model.init.upcycle_from`).

    config.py     HF config <-> model.* keys per family, and the check that they match
    tensors.py    which HF tensor each moetrain tensor is; slice reads
    load.py       loading into a parallelised model, each rank its own slices
    export.py     writing the HF folder;  tokenizer.py  tokenizers in HF form
    __main__.py   python -m moetrain.hf export | overrides

The families and what is verified against transformers: docs/families.md.
"""
