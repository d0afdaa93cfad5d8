"""Interoperability: other checkpoints and the Hugging Face format.

    llama.py      our models to and from transformers' Llama, Qwen2, Qwen3 and Mistral
    official.py   the SUBLLM authors' released checkpoints
    weights.py    reading weights and configs from files (safetensors, .bin, state dicts)
    tokenizer.py  tokenizer files and their end-of-text token
    export.py     writing Hugging Face SubLLM directories (export, convert)
    trainer.py    the transformers.Trainer callback for SUBLLM's schedules
"""
