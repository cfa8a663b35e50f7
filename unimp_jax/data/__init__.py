"""Data: unified on-disk format, converters, the embedded dataset, tokenizer, task builders, pipeline."""
