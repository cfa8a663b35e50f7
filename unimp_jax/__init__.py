"""UniMP in JAX: one vision-language model for multi-modal personalization."""

import os

# transformers says "PyTorch was not found..." on import when torch is absent (the default install: only
# its tokenizers and config files are used here). That advisory is noise for every command; set the
# variable to '' to see transformers' advisories again.
os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
