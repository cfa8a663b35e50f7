"""Hugging Face interop: name/layout mapping to CLIP, Llama and IDEFICS checkpoints."""
